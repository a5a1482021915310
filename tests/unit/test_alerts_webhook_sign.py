"""The webhook signature scheme against a vector computed outside Python:

printf '%s' '1700000000.{"alert_id":"a-1"}' | openssl dgst -sha256 -hmac 'whsec_test'
"""

from __future__ import annotations

from node.alerts.webhook import sign, verify

SECRET = b"whsec_test"
TS = 1700000000
BODY = b'{"alert_id":"a-1"}'
EXPECTED = "sha256=854f515b140e6505d1891fab4d2370eebb4d3ee7ed34509bb47d113827ec6c15"


def test_sign_matches_openssl_vector() -> None:
    assert sign(SECRET, TS, BODY) == EXPECTED


def test_verify_accepts_the_vector_within_tolerance() -> None:
    assert verify(SECRET, str(TS), EXPECTED, BODY, now=TS + 10)
    assert verify(SECRET, f" {TS} ", EXPECTED + "\n", BODY, now=TS - 299)


def test_verify_rejects_tampering_wrong_key_and_stale_or_future_timestamps() -> None:
    assert not verify(SECRET, str(TS), EXPECTED, BODY + b" ", now=TS)  # body changed
    assert not verify(b"other", str(TS), EXPECTED, BODY, now=TS)  # other key
    assert not verify(SECRET, str(TS + 1), EXPECTED, BODY, now=TS)  # timestamp is signed too
    assert not verify(SECRET, str(TS), EXPECTED, BODY, now=TS + 301)  # stale
    assert not verify(SECRET, str(TS), EXPECTED, BODY, now=TS - 301)  # from the future
    assert not verify(SECRET, str(TS), EXPECTED, BODY, now=TS + 3600, tolerance_s=3000)
    assert verify(SECRET, str(TS), EXPECTED, BODY, now=TS + 3600, tolerance_s=3600)


def test_verify_never_raises_on_malformed_headers() -> None:
    assert not verify(SECRET, "", EXPECTED, BODY, now=TS)
    assert not verify(SECRET, "17e8", EXPECTED, BODY, now=TS)
    assert not verify(SECRET, str(TS), "", BODY, now=TS)
    assert not verify(SECRET, str(TS), EXPECTED.removeprefix("sha256="), BODY, now=TS)  # prefix required
    assert not verify(SECRET, str(TS), "sha256=é" + EXPECTED[8:], BODY, now=TS)
