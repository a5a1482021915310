"""Console login: PBKDF2 password hashes, users with roles, signed session cookies, CSRF tokens.

Password hashes are `pbkdf2_sha256$<iterations>$<salt>$<hash>` (salt and hash base64 without
padding, the format Django and passlib use), made with `cxrnode web hash-password`.

Users (decided at start by `resolve_users`): every `[[web.users]]` entry (role `admin` or
`viewer`), plus `web.admin_user` as an admin when `web.password_hash` is set (older configs).
With neither:
- production mode: the console refuses to start (`AuthConfigError`) — there is no default password;
- embedded/dev mode: a random one-time password for `web.admin_user` is generated and logged once
  at start; it lives only in this process.

Sessions are an HMAC-SHA256-signed cookie (user, expiry, CSRF token). The key comes from
node.web.session_key (a file), so sessions survive a restart; the user's role is looked up on each
request, so a user removed from the config is logged out at the next restart. Logging out revokes the
session on the server (:class:`RevokedSessions`, a file beside the key shared by every console
process): the cookie, replayed, no longer opens anything.

Failed logins are throttled per address and per account (:class:`LoginThrottle`), so guessing one
account's password from many addresses is as slow as from one.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

ALGORITHM = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000  # OWASP 2023 recommendation for PBKDF2-HMAC-SHA256
SESSION_SECONDS = 8 * 3600


class AuthConfigError(RuntimeError):
    """The console cannot start with this configuration (the message says what to do)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS, salt: str | None = None) -> str:
    salt = salt or _b64(secrets.token_bytes(16))
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("ascii"), iterations)
    return f"{ALGORITHM}${iterations}${salt}${_b64(digest)}"


def check_hash_format(encoded: str) -> None:
    """Raise AuthConfigError unless `encoded` is a well-formed pbkdf2_sha256 hash."""
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != ALGORITHM or not parts[1].isdigit() or not parts[2] or not parts[3]:
        raise AuthConfigError(
            "the password hash must look like 'pbkdf2_sha256$<iterations>$<salt>$<hash>'; "
            "make one with: cxrnode web hash-password"
        )
    try:
        _unb64(parts[3])
    except ValueError as e:
        raise AuthConfigError(f"the hash part is not base64 ({e})") from e


def verify_password(password: str, encoded: str) -> bool:
    try:
        algorithm, iterations, salt, expected = encoded.split("$")
        if algorithm != ALGORITHM:
            return False
        digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("ascii"), int(iterations))
        return hmac.compare_digest(digest, _unb64(expected))
    except ValueError:
        return False


ADMIN: Final = "admin"
VIEWER: Final = "viewer"


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    role: str  # ADMIN or VIEWER
    one_time: bool = False  # generated at start (dev mode), logged once

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def resolve_users(
    configured: Iterable[tuple[str, str, str]], *, admin_user: str, password_hash: str, production: bool
) -> tuple[dict[str, User], str | None]:
    """The logins by name, and in dev mode without any user the generated password (caller logs it once).

    `configured` is (name, password_hash, role) per `[[web.users]]` entry; `admin_user` with
    `password_hash` is one more admin (older single-admin configs).
    """
    entries = list(configured)
    if password_hash:
        entries.append((admin_user, password_hash, ADMIN))
    users: dict[str, User] = {}
    for name, encoded, role in entries:
        try:
            check_hash_format(encoded)
        except AuthConfigError as e:
            raise AuthConfigError(f"console user {name!r}: {e}") from e
        if name in users:
            raise AuthConfigError(f"console user {name!r} is configured twice (web.users, web.admin_user)")
        users[name] = User(name, encoded, role)
    if users:
        return users, None
    if production:
        raise AuthConfigError(
            "web.production is true but no console user is configured: the admin console has no default "
            "password in production. Set web.password_hash (cxrnode web hash-password) or "
            "CXRNODE_WEB__PASSWORD_HASH, or add [[web.users]] entries, or set web.enabled = false."
        )
    password = secrets.token_urlsafe(12)
    # Fewer iterations: this hash lives in memory for one process only.
    one_time = User(admin_user, hash_password(password, iterations=100_000), ADMIN, one_time=True)
    return {admin_user: one_time}, password


def authenticate(users: dict[str, User], name: str, password: str) -> User | None:
    """The user when the password is right. An unknown name costs a hash check too (no name probing by timing)."""
    user = users.get(name)
    reference = user or next(iter(users.values()))
    ok = verify_password(password, reference.password_hash)
    return user if ok and user is not None else None


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str
    expires: float


class SessionSigner:
    """Signs and verifies the session cookie: base64(json payload) + '.' + base64(HMAC-SHA256)."""

    def __init__(self, key: bytes, max_age: float = SESSION_SECONDS) -> None:
        if len(key) < 32:
            raise ValueError("session keys are at least 32 bytes")
        self._key = key
        self.max_age = max_age

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, user: str) -> tuple[str, Session]:
        session = Session(user=user, csrf=secrets.token_urlsafe(24), expires=time.time() + self.max_age)
        payload = _b64(json.dumps({"u": session.user, "c": session.csrf, "e": session.expires}).encode())
        return f"{payload}.{self._mac(payload)}", session

    def load(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        payload, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(user=str(data["u"]), csrf=str(data["c"]), expires=float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None


class RevokedSessions:
    """Sessions ended by logout before their expiry, in a file every console process reads.

    One line per revoked session: SHA-256 of its CSRF token (a random per-session value; the file holds
    nothing a cookie could be rebuilt from) and its expiry. Lines whose session has expired anyway are
    dropped when the file is rewritten; readers reload it when it changes.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._revoked: dict[str, float] = {}

    @staticmethod
    def _id(session: Session) -> str:
        return hashlib.sha256(session.csrf.encode()).hexdigest()

    def revoke(self, session: Session) -> None:
        with self._lock:
            self._load()
            now = self._clock()
            self._revoked = {k: e for k, e in self._revoked.items() if e > now}
            self._revoked[self._id(session)] = session.expires
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.writelines(f"{k} {e:.0f}\n" for k, e in self._revoked.items())
            os.replace(tmp, self.path)
            self._seen = None

    def is_revoked(self, session: Session) -> bool:
        with self._lock:
            self._load()
            return self._id(session) in self._revoked

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._revoked, self._seen = {}, None
            return
        if self._seen == (st.st_mtime_ns, st.st_size):
            return
        revoked: dict[str, float] = {}
        for line in self.path.read_text().splitlines():
            key, _, expires = line.partition(" ")
            try:
                revoked[key] = float(expires)
            except ValueError:
                continue
        self._revoked, self._seen = revoked, (st.st_mtime_ns, st.st_size)


class LoginThrottle:
    """After `max_failures` failed logins from one address within `window_s`, refuse it for `window_s`."""

    def __init__(
        self, max_failures: int = 5, window_s: float = 900.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_failures, self.window_s, self._clock = max_failures, window_s, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, peer: str, now: float) -> list[float]:
        recent = [t for t in self._failures.get(peer, []) if now - t < self.window_s]
        self._failures[peer] = recent
        return recent

    def retry_after(self, peer: str) -> float:
        """Seconds until `peer` may try again (0 = now)."""
        with self._lock:
            now = self._clock()
            recent = self._recent(peer, now)
            if len(recent) < self.max_failures:
                return 0.0
            return max(0.0, recent[-1] + self.window_s - now)

    def failed(self, peer: str) -> None:
        with self._lock:
            now = self._clock()
            self._recent(peer, now).append(now)

    def succeeded(self, peer: str) -> None:
        with self._lock:
            self._failures.pop(peer, None)


def read_new_password(from_stdin: bool) -> str:
    """The password to hash: one line of stdin with `from_stdin` or when stdin is no terminal (a pipe,
    a script, `docker run -i`: no prompt could be answered), else prompted twice without echo.

    Raises ValueError with the message for the user (nothing given, the two entries differ).
    """
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise ValueError(
                "no password on stdin (give it as one line: "
                "printf '%s\\n' \"$PASSWORD\" | cxrnode web hash-password --stdin)"
            )
        return line.rstrip("\r\n")
    try:
        password = getpass.getpass("Password: ")
        again = getpass.getpass("Again: ")
    except EOFError as e:
        raise ValueError("no password given") from e
    if password != again:
        raise ValueError("passwords differ")
    return password


def main(argv: list[str] | None = None) -> int:
    """`cxrnode web hash-password [--stdin]`: print a hash for web.password_hash or [[web.users]]."""
    parser = argparse.ArgumentParser(prog="cxrnode web", description="Console password tools")
    sub = parser.add_subparsers(dest="command", required=True)
    hp = sub.add_parser("hash-password", help="print a password hash for web.password_hash or a [[web.users]] entry")
    hp.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    hp.add_argument(
        "--stdin",
        action="store_true",
        help="read the password as one line from stdin, no prompt (the default when stdin is no terminal)",
    )
    args = parser.parse_args(argv)
    try:
        password = read_new_password(args.stdin)
    except ValueError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 1
    if len(password) < 8:
        sys.stderr.write("use at least 8 characters\n")
        return 1
    sys.stdout.write(hash_password(password, args.iterations) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
