"""AE title administration: add, update, remove, and C-ECHO a known AE (through node.admin.service).

Every change goes through :class:`node.audit.AuditStore`, which appends an event naming the actor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from node.audit import AETitle, AuditStore, StoreError
from node.export.sender import Destination, echo, tls_client_context
from node.runtime.config import AEEntry, TLSConfig

log = logging.getLogger(__name__)


class AdminError(ValueError):
    """An administrative request that cannot be carried out; the message says why."""


#: What an AE entry may carry besides its name (the configuration's [[ae]] keys): a DICOM peer has
#: host/port/tls (and storage_commitment as a destination), a STOW-RS destination url/auth/username/secret.
AE_FIELDS = tuple(name for name in AEEntry.model_fields if name != "name")


def validate_entry(name: str, **fields: Any) -> AEEntry:
    """Validate an AE entry with the same rules as the configuration file."""
    if unknown := set(fields) - set(AE_FIELDS):
        raise AdminError(f"unknown AE field(s): {', '.join(sorted(unknown))}")
    try:
        return AEEntry(name=name, **fields)
    except ValidationError as e:
        raise AdminError("; ".join(_message(err) for err in e.errors())) from e


def _message(err: Any) -> str:
    """`field: why` for a field's error, just `why` for the entry's own rules (pydantic's prefix dropped)."""
    why = str(err["msg"]).removeprefix("Value error, ")
    field = ".".join(str(p) for p in err["loc"])
    return f"{field}: {why}" if field else why


def _values(entry: AEEntry) -> dict[str, Any]:
    return {f: getattr(entry, f) for f in AE_FIELDS}


def add_ae(store: AuditStore, name: str, *, actor: str = "cli", **fields: Any) -> AETitle:
    """Add a DICOM AE, or with `url` a STOW-RS destination (auth none/bearer/basic)."""
    entry = validate_entry(name, **fields)
    try:
        return store.add_ae(entry.name, actor=actor, **_values(entry))
    except StoreError as e:
        raise AdminError(str(e)) from e


def update_ae(store: AuditStore, name: str, *, actor: str = "cli", **fields: Any) -> AETitle:
    """Replace the fields of a known AE title, validated like a new entry."""
    entry = validate_entry(name, **fields)
    try:
        return store.update_ae(entry.name, actor=actor, **_values(entry))
    except StoreError as e:
        raise AdminError(str(e)) from e


def remove_ae(store: AuditStore, name: str, *, actor: str = "cli") -> None:
    try:
        store.remove_ae(name.strip(), actor=actor)
    except StoreError as e:
        raise AdminError(str(e)) from e


@dataclass(frozen=True)
class EchoResult:
    ae_title: str
    host: str
    port: int
    ok: bool
    status: int | None
    round_trip_ms: float
    detail: str
    protocol: str = "C-ECHO"  # "QIDO-RS" for a STOW-RS destination (node.dicomweb.client.probe)


def echo_ae(
    store: AuditStore, name: str, *, calling_ae: str, tls: TLSConfig, timeout: float = 10.0, actor: str = "cli"
) -> EchoResult:
    """C-ECHO a known AE from the node's AE title, as the exporter would reach it (TLS when the AE says
    so, with dicom.tls's CA and certificate); audited as an outbound association and an event.

    The one echo of the node: `cxrnode ae echo` and the console's C-ECHO button both call this.
    """
    entry = store.get_ae(name.strip())
    if entry is None:
        raise AdminError(f"no AE title {name!r}")
    if entry.url:
        return _probe_stow(store, entry, tls=tls, timeout=timeout, actor=actor)
    if entry.host is None or entry.port is None:
        raise AdminError(f"AE title {entry.name!r} has no host and port to contact")
    try:
        ssl_context = tls_client_context(tls) if entry.tls else None
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise AdminError(f"AE title {entry.name!r} needs TLS, but the node's TLS files cannot be loaded: {e}") from e
    r = echo(Destination(entry.name, entry.host, entry.port, entry.tls), calling_ae, timeout, ssl_context)
    result = EchoResult(entry.name, entry.host, entry.port, r.ok, r.status, r.seconds * 1000, r.detail)
    association_id = store.record_association(
        calling_ae=calling_ae,
        called_ae=entry.name,
        peer_host=entry.host,
        peer_port=entry.port,
        result="released" if result.ok else "failed",
        reason="" if result.ok else r.detail,
        tls=entry.tls,
        direction="outbound",
    )
    store.add_event(
        "ae.echo",
        actor=actor,
        association_id=association_id,
        detail={
            "name": entry.name,
            "ok": result.ok,
            "detail": r.detail,
            "tls": entry.tls,
            "round_trip_ms": round(result.round_trip_ms, 1),
        },
    )
    log.info("C-ECHO %s@%s:%d%s: %s", entry.name, entry.host, entry.port, " (TLS)" if entry.tls else "", r.detail)
    return result


def _probe_stow(store: AuditStore, entry: AETitle, *, tls: TLSConfig, timeout: float, actor: str) -> EchoResult:
    """A STOW-RS destination has no C-ECHO: one QIDO-RS search with its credentials stands in for it."""
    from node.dicomweb.client import StowDestination, https_verify, probe

    assert entry.url is not None
    try:
        verify = https_verify(tls)
    except (OSError, ValueError) as e:
        raise AdminError(f"{entry.name!r} is HTTPS, but the node's CA file cannot be loaded: {e}") from e
    r = probe(
        StowDestination(entry.name, entry.url, entry.auth, entry.username, entry.secret),
        timeout_s=timeout,
        verify=verify,
    )
    result = EchoResult(entry.name, entry.url, 0, r.ok, r.status, r.seconds * 1000, r.detail, "QIDO-RS")
    store.add_event(
        "ae.echo",
        actor=actor,
        detail={
            "name": entry.name,
            "ok": r.ok,
            "detail": r.detail,
            "url": entry.url,
            "round_trip_ms": round(result.round_trip_ms, 1),
        },
    )
    log.info("QIDO-RS probe of %s at %s: %s", entry.name, entry.url, r.detail)
    return result
