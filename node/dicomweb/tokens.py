"""STOW-RS tokens: one or more per source; the source name stands for a calling AE title.

A token is 256 random bits, shown once when it is made; the audit DB keeps only its SHA-256 (a slow
password hash buys nothing for a random secret of this length, and a fast lookup by hash means no token is
ever compared character by character). The CLI (`cxrnode stow-token …`) and the console both call these.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from node.audit import AuditStore, StoreError, StowToken
from node.runtime.config import validate_ae_title

PREFIX = "cxrstow_"


class TokenError(ValueError):
    """A token request that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class NewToken:
    row: StowToken
    token: str  # shown once; not stored


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def add_token(store: AuditStore, source: str, *, description: str = "", actor: str = "cli") -> NewToken:
    """A new token for `source` (validated like an AE title: it is the calling AE for routing and audit)."""
    try:
        name = validate_ae_title(source)
    except ValueError as e:
        raise TokenError(f"source: {e}") from e
    token = PREFIX + secrets.token_urlsafe(32)
    return NewToken(store.add_stow_token(name, token_sha256(token), description=description, actor=actor), token)


def revoke_token(store: AuditStore, token_id: int, *, actor: str = "cli") -> StowToken:
    try:
        return store.revoke_stow_token(token_id, actor=actor)
    except StoreError as e:
        raise TokenError(str(e)) from e


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer …` header, None when there is none."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def source_for(store: AuditStore, authorization: str) -> str | None:
    """The source a request's bearer token belongs to; None for no, unknown or revoked tokens."""
    token = bearer_token(authorization)
    if token is None:
        return None
    row = store.find_stow_token(token_sha256(token))
    return row.source if row is not None else None
