"""The audit store's AE titles and the STOW-RS tokens that stand for them (writes and reads).

A mixin of :class:`node.audit.store.AuditStore`, kept apart for size: the same rules hold (every
write one transaction, every change an event in it). Callers validate entries first (node.admin).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.audit.models import AERole, AETitle, StowToken, utcnow
from node.audit.txn import StoreError, _event


class AEStoreMixin:
    session: Callable[[], AbstractContextManager[Session]]
    reading: Callable[[], AbstractContextManager[Session]]
    node: str

    # -- AE titles ------------------------------------------------------------------------------------

    def list_ae(self) -> list[AETitle]:
        with self.session() as s:
            return list(s.scalars(select(AETitle).order_by(AETitle.name)))

    def get_ae(self, name: str) -> AETitle | None:
        with self.reading() as s:
            return s.scalar(select(AETitle).where(AETitle.name == name))

    def add_ae(
        self,
        name: str,
        *,
        host: str | None = None,
        port: int | None = None,
        role: AERole | str = AERole.BOTH,
        tls: bool = False,
        description: str = "",
        storage_commitment: bool = False,
        url: str | None = None,
        auth: str = "none",
        username: str = "",
        secret: str = "",
        actor: str = "cli",
    ) -> AETitle:
        """Add an AE title (already validated by the caller); StoreError if the name exists.

        With `url` it is a STOW-RS destination (`auth` none/bearer/basic with `username`/`secret`)."""
        try:
            with self.session() as s:
                row = AETitle(
                    name=name,
                    host=host,
                    port=port,
                    role=str(AERole(role)),
                    tls=tls,
                    storage_commitment=storage_commitment,
                    description=description,
                    url=url or None,
                    auth=auth,
                    username=username,
                    secret=secret,
                )
                s.add(row)
                s.flush()
                _event(s, "ae.added", actor=actor, detail=_ae_detail(row))
                return row
        except IntegrityError as e:
            raise StoreError(f"AE title {name!r} already exists") from e

    def update_ae(self, name: str, *, actor: str = "cli", **changes: Any) -> AETitle:
        """Change host/port/role/tls/storage_commitment/description (or a STOW-RS destination's
        url/auth/username/secret) of an AE title; the event records old and new values."""
        allowed = {
            "host",
            "port",
            "role",
            "tls",
            "storage_commitment",
            "description",
            "url",
            "auth",
            "username",
            "secret",
        }
        if unknown := set(changes) - allowed:
            raise StoreError(f"cannot change {sorted(unknown)} of an AE title")
        with self.session() as s:
            row = s.scalar(select(AETitle).where(AETitle.name == name))
            if row is None:
                raise StoreError(f"no AE title {name!r}")
            before = _ae_detail(row)
            for key, value in changes.items():
                setattr(row, key, str(AERole(value)) if key == "role" else value)
            s.flush()
            _event(s, "ae.updated", actor=actor, detail={"before": before, "after": _ae_detail(row)})
            return row

    def remove_ae(self, name: str, *, actor: str = "cli") -> None:
        with self.session() as s:
            row = s.scalar(select(AETitle).where(AETitle.name == name))
            if row is None:
                raise StoreError(f"no AE title {name!r}")
            detail = _ae_detail(row)
            s.delete(row)
            _event(s, "ae.removed", actor=actor, detail=detail)

    def seed_ae(self, entries: Sequence[Any], *, actor: str = "config") -> int:
        """Add AE titles from config ``[[ae]]`` entries that the DB does not know yet; returns how many.

        Entries already in the DB are left alone: the DB is the administrator's live copy.
        """
        added = 0
        for e in entries:
            if self.get_ae(e.name) is None:
                try:
                    self.add_ae(
                        e.name,
                        host=e.host,
                        port=e.port,
                        role=e.role,
                        tls=e.tls,
                        storage_commitment=e.storage_commitment,
                        description=e.description,
                        url=e.url,
                        auth=e.auth,
                        username=e.username,
                        secret=e.secret,
                        actor=actor,
                    )
                    added += 1
                except StoreError:
                    pass  # another process seeded it first
        return added

    # -- STOW-RS tokens (node.dicomweb.tokens makes and checks them) --------------------------------------

    def add_stow_token(self, source: str, token_sha256: str, *, description: str = "", actor: str = "cli") -> StowToken:
        with self.session() as s:
            row = StowToken(source=source, token_sha256=token_sha256, description=description)
            s.add(row)
            s.flush()
            _event(
                s, "stow_token.added", actor=actor, detail={"id": row.id, "source": source, "description": description}
            )
            return row

    def find_stow_token(self, token_sha256: str) -> StowToken | None:
        """The live (not revoked) token with this hash, if any."""
        with self.session() as s:
            return s.scalar(
                select(StowToken).where(StowToken.token_sha256 == token_sha256).where(StowToken.revoked_at.is_(None))
            )

    def list_stow_tokens(self, *, include_revoked: bool = False) -> list[StowToken]:
        q = select(StowToken).order_by(StowToken.source, StowToken.id)
        if not include_revoked:
            q = q.where(StowToken.revoked_at.is_(None))
        with self.session() as s:
            return list(s.scalars(q))

    def revoke_stow_token(self, token_id: int, *, actor: str = "cli") -> StowToken:
        with self.session() as s:
            row = s.get(StowToken, token_id, with_for_update=True)
            if row is None or row.revoked_at is not None:
                raise StoreError(f"no live STOW-RS token with id {token_id}")
            row.revoked_at = utcnow()
            _event(s, "stow_token.revoked", actor=actor, detail={"id": row.id, "source": row.source})
            return row


def _ae_detail(row: AETitle) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "name": row.name,
        "host": row.host,
        "port": row.port,
        "role": row.role,
        "tls": row.tls,
        "storage_commitment": row.storage_commitment,
        "description": row.description,
    }
    if row.url:  # a STOW-RS destination; its secret never goes to the log
        detail.update(url=row.url, auth=row.auth, username=row.username, secret_set=bool(row.secret))
    return detail
