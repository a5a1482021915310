"""AE title administration: add, list, remove, and C-ECHO a known AE (used by the CLI and the web console).

Every change goes through :class:`node.audit.AuditStore`, which appends an event naming the actor.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass

from pydantic import ValidationError
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import AETitle, AuditStore, StoreError
from node.config import AEEntry, Settings

log = logging.getLogger(__name__)


class AdminError(ValueError):
    """An administrative request that cannot be carried out; the message says why."""


def validate_entry(name: str, *, host: str | None, port: int | None, role: str, tls: bool,
                   description: str) -> AEEntry:
    """Validate an AE entry with the same rules as the configuration file."""
    try:
        return AEEntry(name=name, host=host, port=port, role=role,  # type: ignore[arg-type]
                       tls=tls, description=description)
    except ValidationError as e:
        raise AdminError("; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
                                   for err in e.errors())) from e


def add_ae(store: AuditStore, name: str, *, host: str | None = None, port: int | None = None,
           role: str = "both", tls: bool = False, description: str = "", actor: str = "cli") -> AETitle:
    entry = validate_entry(name, host=host, port=port, role=role, tls=tls, description=description)
    try:
        return store.add_ae(entry.name, host=entry.host, port=entry.port, role=entry.role, tls=entry.tls,
                            description=entry.description, actor=actor)
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


def client_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS for outgoing associations: verify the peer with dicom.tls.ca_file, present our cert if set."""
    tls = settings.dicom.tls
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(tls.ca_file) if tls.ca_file else None)
    ctx.check_hostname = False  # DICOM peers are identified by certificate chain, not by host name
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def echo_ae(settings: Settings, store: AuditStore, name: str, *, timeout: float = 10.0,
            actor: str = "cli") -> EchoResult:
    """C-ECHO a known AE from the node's AE title; audited as an outbound association and an event."""
    entry = store.get_ae(name.strip())
    if entry is None:
        raise AdminError(f"no AE title {name!r}")
    if entry.host is None or entry.port is None:
        raise AdminError(f"AE title {entry.name!r} has no host and port to contact")
    ae = AE(ae_title=settings.sender.calling_ae or settings.dicom.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    tls_args = (client_ssl_context(settings), "") if entry.tls else None
    start = time.perf_counter()
    status: int | None = None
    try:
        assoc = ae.associate(entry.host, entry.port, ae_title=entry.name, tls_args=tls_args)
        if assoc.is_established:
            rsp = assoc.send_c_echo()
            status = int(rsp.Status) if "Status" in rsp else None
            assoc.release()
            detail = "success" if status == 0 else ("no response" if status is None else f"status 0x{status:04X}")
        elif assoc.is_rejected:
            detail = "association rejected"
        else:
            detail = "association failed (no answer or aborted)"
    except Exception as e:  # network errors must become a clear message
        detail = f"error: {e}"
    elapsed = (time.perf_counter() - start) * 1000
    result = EchoResult(entry.name, entry.host, entry.port, status == 0, status, elapsed, detail)
    association_id = store.record_association(
        calling_ae=ae.ae_title, called_ae=entry.name, peer_host=entry.host, peer_port=entry.port,
        result="released" if result.ok else "failed", reason="" if result.ok else detail, tls=entry.tls,
        direction="outbound")
    store.add_event("ae.echo", actor=actor, association_id=association_id,
                    detail={"name": entry.name, "ok": result.ok, "detail": detail,
                            "round_trip_ms": round(elapsed, 1)})
    return result
