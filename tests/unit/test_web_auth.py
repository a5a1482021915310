"""Console login: password hashes, users and roles, the no-default-password rule, signed sessions."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from node.runtime.config import ConfigError, load_settings
from node.web.auth import (
    AuthConfigError,
    LoginThrottle,
    SessionSigner,
    authenticate,
    check_hash_format,
    hash_password,
    resolve_users,
    verify_password,
)

KEY = b"k" * 32


def test_hash_round_trip_and_wrong_password() -> None:
    h = hash_password("correct horse", iterations=1000)
    assert h.startswith("pbkdf2_sha256$1000$")
    assert verify_password("correct horse", h)
    assert not verify_password("correct horse!", h)
    assert not verify_password("correct horse", "md5$1$x$y")
    assert not verify_password("x", "garbage")


def test_published_pbkdf2_vector() -> None:
    # PBKDF2-HMAC-SHA256(P="password", S="salt", c=1, dkLen=32) = 120fb6cf…0be17b (published test vector).
    expected = "pbkdf2_sha256$1$salt$" + "Eg+2z/z4syxD5yJSVsT4N6hlSMkszDVICAWYfLcL4Xs"
    assert hash_password("password", 1, "salt") == expected
    assert verify_password("password", expected)


def test_production_without_any_user_refuses_with_a_clear_message() -> None:
    with pytest.raises(AuthConfigError, match=r"no default password in production.*password_hash.*web.users"):
        resolve_users([], admin_user="admin", password_hash="", production=True)


def test_malformed_hash_is_a_configuration_error() -> None:
    for bad in ("secret", "pbkdf2_sha256$abc$salt$hash", "bcrypt$12$x$y"):
        with pytest.raises(AuthConfigError, match="pbkdf2_sha256"):
            check_hash_format(bad)


def test_dev_mode_without_any_user_makes_a_one_time_admin_password() -> None:
    users, password = resolve_users([], admin_user="admin", password_hash="", production=False)
    assert list(users) == ["admin"] and users["admin"].one_time and users["admin"].is_admin
    assert password is not None and len(password) >= 12
    assert verify_password(password, users["admin"].password_hash)
    _, other = resolve_users([], admin_user="admin", password_hash="", production=False)
    assert other != password


def test_single_admin_config_is_used_as_is() -> None:
    h = hash_password("pw-12345", 1000)
    users, password = resolve_users([], admin_user="ops", password_hash=h, production=True)
    assert password is None and list(users) == ["ops"]
    assert users["ops"].password_hash == h and users["ops"].is_admin and not users["ops"].one_time


def test_users_with_roles_beside_the_single_admin() -> None:
    admin_hash, viewer_hash = hash_password("admin-pw", 1000), hash_password("viewer-pw", 1000)
    users, password = resolve_users(
        [("ward", viewer_hash, "viewer")], admin_user="admin", password_hash=admin_hash, production=True
    )
    assert password is None and {u.name: u.is_admin for u in users.values()} == {"ward": False, "admin": True}
    assert authenticate(users, "ward", "viewer-pw") == users["ward"]
    assert authenticate(users, "ward", "admin-pw") is None  # another user's password
    assert authenticate(users, "nobody", "admin-pw") is None
    # Without web.password_hash the [[web.users]] alone are the logins, also in production.
    only, _ = resolve_users([("ward", viewer_hash, "viewer")], admin_user="admin", password_hash="", production=True)
    assert list(only) == ["ward"]
    with pytest.raises(AuthConfigError, match="'ward': the password hash must look like"):
        resolve_users([("ward", "plain-text", "viewer")], admin_user="admin", password_hash="", production=False)


def test_user_config_is_validated() -> None:
    h = hash_password("x" * 8, 1000)
    settings = load_settings(None, web={"users": [{"name": "ward", "password_hash": h}]})
    assert settings.web.users[0].role == "viewer"  # least privilege by default
    for web, message in [
        ({"users": [{"name": "a", "password_hash": h, "role": "root"}]}, "web.users.0.role"),
        ({"password_hash": h, "users": [{"name": "admin", "password_hash": h}]}, "more than once"),
        ({"users": [{"name": " ", "password_hash": h}]}, "user names"),
        ({"session_hours": 0}, "web.session_hours"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings(None, web=web)


def test_session_cookie_is_signed_and_expires() -> None:
    signer = SessionSigner(KEY, max_age=60)
    cookie, session = signer.issue("admin")
    loaded = signer.load(cookie)
    assert loaded == session
    payload, mac = cookie.rsplit(".", 1)
    assert signer.load(payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")) is None
    assert SessionSigner(b"o" * 32).load(cookie) is None  # signed with another key
    assert SessionSigner(KEY).load(cookie) == session  # same key, another process: still valid
    assert signer.load(None) is None and signer.load("no-dot") is None
    expired = SessionSigner(KEY, max_age=-1)
    old, _ = expired.issue("admin")
    assert expired.load(old) is None
    assert session.expires > time.time()
    with pytest.raises(ValueError, match="32 bytes"):
        SessionSigner(b"short")


def test_hash_password_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "node.web.auth", "hash-password", "--stdin", "--iterations", "1000"],
        input="long enough password\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert verify_password("long enough password", proc.stdout.strip())
    short = subprocess.run(
        [sys.executable, "-m", "node.web.auth", "hash-password", "--stdin"],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode == 1 and "8 characters" in short.stderr


@pytest.mark.parametrize("stdin_flag", [["--stdin"], []])
def test_cxrnode_web_hash_password_without_a_terminal(stdin_flag: list[str]) -> None:
    """The documented command, from a script or `docker run -i` (no terminal): stdin, no traceback."""
    cmd = [sys.executable, "-m", "node.cli.main", "web", "hash-password", *stdin_flag]
    piped = subprocess.run(cmd, input="long enough password\r\n", capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert verify_password("long enough password", piped.stdout.strip())
    empty = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and empty.stdout == ""
    assert "no password on stdin" in empty.stderr and "Traceback" not in empty.stderr


def test_login_throttle_blocks_an_address_after_repeated_failures() -> None:
    now = [1000.0]
    throttle = LoginThrottle(max_failures=3, window_s=600, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("10.0.0.9")
    assert throttle.retry_after("10.0.0.9") == 0
    throttle.failed("10.0.0.9")
    assert throttle.retry_after("10.0.0.9") == 600
    assert throttle.retry_after("10.0.0.10") == 0  # other addresses are not affected
    now[0] += 599
    assert throttle.retry_after("10.0.0.9") == 1
    now[0] += 1
    assert throttle.retry_after("10.0.0.9") == 0  # the failures aged out of the window
    throttle.failed("10.0.0.9")
    throttle.succeeded("10.0.0.9")
    assert throttle.retry_after("10.0.0.9") == 0
