"""Console login: password hashes, the no-default-password rule, signed sessions."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from node.web.auth import (
    AuthConfigError,
    LoginThrottle,
    SessionSigner,
    check_hash_format,
    hash_password,
    resolve_credentials,
    verify_password,
)


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


def test_production_without_hash_refuses_with_a_clear_message() -> None:
    with pytest.raises(AuthConfigError, match="no default password in production.*password_hash"):
        resolve_credentials("admin", "", production=True)


def test_malformed_hash_is_a_configuration_error() -> None:
    for bad in ("secret", "pbkdf2_sha256$abc$salt$hash", "bcrypt$12$x$y"):
        with pytest.raises(AuthConfigError, match="pbkdf2_sha256"):
            check_hash_format(bad)


def test_dev_mode_without_hash_makes_a_one_time_password() -> None:
    creds, password = resolve_credentials("admin", "", production=False)
    assert creds.one_time and password is not None and len(password) >= 12
    assert verify_password(password, creds.password_hash)
    _, other = resolve_credentials("admin", "", production=False)
    assert other != password


def test_configured_hash_is_used_as_is() -> None:
    h = hash_password("pw-12345", 1000)
    creds, password = resolve_credentials("ops", h, production=True)
    assert password is None and creds.user == "ops" and creds.password_hash == h and not creds.one_time


def test_session_cookie_is_signed_and_expires() -> None:
    signer = SessionSigner(max_age=60)
    cookie, session = signer.issue("admin")
    loaded = signer.load(cookie)
    assert loaded == session
    payload, mac = cookie.rsplit(".", 1)
    assert signer.load(payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")) is None
    assert SessionSigner().load(cookie) is None  # another process' key (a restart logs everybody out)
    assert signer.load(None) is None and signer.load("no-dot") is None
    expired = SessionSigner(max_age=-1)
    old, _ = expired.issue("admin")
    assert expired.load(old) is None
    assert session.expires > time.time()


def test_hash_password_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "node.web.auth", "hash-password", "--stdin", "--iterations", "1000"],
                          input="long enough password\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert verify_password("long enough password", proc.stdout.strip())
    short = subprocess.run([sys.executable, "-m", "node.web.auth", "hash-password", "--stdin"],
                           input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "8 characters" in short.stderr


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
