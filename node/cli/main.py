"""The `cxrnode` command: serve, config check, audit queries and AE title administration.

Every command finds its configuration like a service (`node.runtime.config.find_config`: --config,
$CXRNODE_CONFIG, /etc/cxrnode/cxrnode.toml). Administrative commands (audit, ae, exports,
reanalyze) only open an audit database a node has already made: an admin command that silently
created a fresh one would report "(none)" or add an AE title that the running node never sees.

Exit status: 0 success, 1 failure (bad configuration, failed echo, unknown study), 2 usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from node.cli.common import (
    actor,
    admin_service,
    config_path,
    err,
    open_store,
    out,
    print_rows,
    since,
)
from node.runtime.config import CONFIG_SEARCH, ConfigError, find_config, load_settings

log = logging.getLogger(__name__)


# -- commands ----------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from node.runtime.start import serve

    path = config_path(args)
    log.info("configuration: %s", path or f"built-in defaults (no file found: looked for {CONFIG_SEARCH})")
    return serve(load_settings(path), str(path) if path else "the built-in defaults")


def cmd_config_check(args: argparse.Namespace) -> int:
    path = find_config(args.file or getattr(args, "config", None))
    if path is None:
        err(f"no configuration file found (looked for {CONFIG_SEARCH})")
        return 1
    from node.runtime.preflight import check_start

    try:
        settings = load_settings(path)
        check_start(settings, str(path))
    except ConfigError as e:
        err(str(e))
        return 1
    out(
        f"OK: {path} (AE title {settings.dicom.ae_title}, port {settings.dicom.port}, "
        f"{len(settings.rules)} rule(s), {len(settings.ae)} AE title(s))"
    )
    return 0


def cmd_audit_studies(args: argparse.Namespace) -> int:
    from node.audit.report import study_row

    rows = [
        study_row(s)
        for s in open_store(args).list_studies(since=args.since, calling_ae=args.ae, state=args.state, limit=args.limit)
    ]
    cols = (
        None
        if args.format != "table"
        else ["study_instance_uid", "first_received", "calling_ae", "accession_number", "instances", "states", "nodes"]
    )
    print_rows(rows, args.format, cols)
    return 0


def cmd_audit_study(args: argparse.Namespace) -> int:
    from node.audit import InstanceFilter
    from node.audit.report import instance_row

    store = open_store(args)
    if store.get_study(args.uid) is None:
        err(f"no study {args.uid}")
        return 1
    rows = [instance_row(i) for i in store.list_instances(InstanceFilter(study_instance_uid=args.uid))]
    cols = (
        None
        if args.format != "table"
        else ["id", "sop_instance_uid", "modality", "node", "state", "rule", "reason", "received_at"]
    )
    print_rows(rows, args.format, cols)
    return 0


def cmd_audit_events(args: argparse.Namespace) -> int:
    from node.audit.report import event_row

    events = open_store(args).list_events(since=args.since, kinds=args.kind or (), calling_ae=args.ae, limit=args.limit)
    rows = [event_row(e) for e in events]
    if args.state:
        rows = [r for r in rows if r["kind"] == f"instance.{args.state}"]
    print_rows(
        rows,
        args.format,
        None
        if args.format != "table"
        else ["id", "at", "kind", "actor", "node", "association_id", "instance_id", "detail"],
    )
    return 0


def cmd_ae_add(args: argparse.Namespace) -> int:
    import os

    from node.admin.service import AdminError

    secret = ""
    if args.secret_env:
        secret = os.environ.get(args.secret_env, "")
        if not secret:
            err(f"error: environment variable {args.secret_env} is empty or not set")
            return 2
    elif args.secret_file:
        try:
            secret = args.secret_file.read_text().strip()
        except OSError as e:
            err(f"error: cannot read {args.secret_file}: {e.strerror or e}")
            return 2
    try:
        row = admin_service(args).add_ae(
            args.name,
            host=args.host,
            port=args.port,
            role=args.role,
            tls=args.tls,
            description=args.description,
            storage_commitment=args.storage_commitment,
            url=args.url,
            auth=args.auth,
            username=args.username,
            secret=secret,
            actor=actor(),
        )
    except AdminError as e:
        err(f"error: {e}")
        return 2
    where = f"STOW-RS {row.url}, auth {row.auth}" if row.url else f"{row.host or '-'}:{row.port or '-'}"
    out(
        f"added AE {row.name} ({row.role}, {where}{', TLS' if row.tls else ''}"
        f"{', storage commitment' if row.storage_commitment else ''})"
    )
    return 0


def cmd_ae_list(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": a.name,
            "host": a.host,
            "port": a.port,
            "role": a.role,
            "tls": a.tls,
            "storage_commitment": a.storage_commitment,
            "url": a.url or "",
            "auth": a.auth if a.url else "",
            "description": a.description,
            "updated_at": a.updated_at.isoformat(timespec="seconds"),
        }
        for a in open_store(args).list_ae()
    ]
    print_rows(
        rows,
        "json" if args.json else "table",
        None
        if args.json
        else ["name", "host", "port", "role", "tls", "storage_commitment", "url", "auth", "description"],
    )
    return 0


def cmd_ae_remove(args: argparse.Namespace) -> int:
    from node.admin.service import AdminError

    try:
        admin_service(args).remove_ae(args.name, actor=actor())
    except AdminError as e:
        err(f"error: {e}")
        return 1
    out(f"removed AE {args.name}")
    return 0


def cmd_ae_echo(args: argparse.Namespace) -> int:
    from node.admin.service import AdminError

    try:
        r = admin_service(args).echo_ae(args.name, actor=actor(), timeout=args.timeout)
    except AdminError as e:
        err(f"error: {e}")
        return 1
    where = r.host if r.protocol != "C-ECHO" else f"{r.host}:{r.port}"
    out(f"{r.protocol} {r.ae_title} at {where}: {r.detail} ({r.round_trip_ms:.1f} ms)")
    return 0 if r.ok else 1


# -- parser ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrnode", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help="TOML configuration file (default: $CXRNODE_CONFIG, else /etc/cxrnode/cxrnode.toml "
        "if it exists, else built-in defaults)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    # The same options after the sub-command; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS, help="TOML configuration file")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the DICOM node")
    p.set_defaults(func=cmd_serve)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_command", required=True)
    p = cfg.add_parser(
        "check",
        parents=[common],
        help="run every start-time check of serve on a configuration (prints OK or each problem)",
    )
    p.add_argument("file", type=Path, nargs="?", help=f"default: {CONFIG_SEARCH}")
    p.set_defaults(func=cmd_config_check)

    fmt = argparse.ArgumentParser(add_help=False)
    g = fmt.add_mutually_exclusive_group()
    g.add_argument("--json", dest="format", action="store_const", const="json", help="JSON output")
    g.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV output")
    fmt.set_defaults(format="table")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", type=since, help="ISO date or date-time (UTC unless given)")
    filters.add_argument("--ae", help="calling AE title")
    filters.add_argument("--state", help="instance state (received, queued, skipped, rejected, ...)")
    filters.add_argument("--limit", type=int)

    audit = sub.add_parser("audit", help="query the audit log").add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser("studies", parents=[common, fmt, filters], help="studies received")
    p.set_defaults(func=cmd_audit_studies)
    p = audit.add_parser("study", parents=[common, fmt], help="the instances of one study")
    p.add_argument("uid", help="Study Instance UID")
    p.set_defaults(func=cmd_audit_study)
    p = audit.add_parser("events", parents=[common, fmt, filters], help="the event log")
    p.add_argument("--kind", action="append", help="event kind, e.g. instance.rejected (repeatable)")
    p.set_defaults(func=cmd_audit_events)

    ae = sub.add_parser("ae", help="AE title administration").add_subparsers(dest="ae_command", required=True)
    p = ae.add_parser("add", parents=[common], help="add a known AE title")
    p.add_argument("name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--role", choices=["source", "destination", "both"], default="both")
    p.add_argument("--tls", action="store_true", help="use DICOM TLS when contacting it")
    p.add_argument(
        "--storage-commitment",
        action="store_true",
        help="after results are stored there, ask it to commit them (Storage Commitment Push Model)",
    )
    p.add_argument("--description", default="")
    p.add_argument("--url", help="a STOW-RS destination: the DICOMweb base URL (results are POSTed to URL/studies)")
    p.add_argument("--auth", choices=["none", "bearer", "basic"], default="none", help="STOW-RS authentication")
    p.add_argument("--username", default="", help="user name for --auth basic")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--secret-env", metavar="VAR", help="read the bearer token / basic password from this environment variable"
    )
    secret.add_argument(
        "--secret-file", type=Path, metavar="FILE", help="read the bearer token / basic password from this file"
    )
    p.set_defaults(func=cmd_ae_add)
    p = ae.add_parser("list", parents=[common], help="list known AE titles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ae_list)
    p = ae.add_parser("remove", parents=[common], help="remove an AE title")
    p.add_argument("name")
    p.set_defaults(func=cmd_ae_remove)
    p = ae.add_parser("echo", parents=[common], help="C-ECHO an AE title from the node")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_ae_echo)

    from node.cli import dicomweb as cli_dicomweb
    from node.cli import ops as cli_ops
    from node.cli import triage as cli_triage

    cli_dicomweb.register(sub, common, fmt)
    cli_ops.register(sub, common, fmt)
    cli_triage.register(sub, common, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from node.runtime.logging_setup import setup_logging

    json_logs = False
    if args.command == "serve" and (path := config_path(args)) is not None:
        with contextlib.suppress(ConfigError):  # reported by the command itself
            json_logs = load_settings(path).web.json_logs
    # PHI-redacting handler; pynetdicom's per-PDU chatter only with --verbose.
    setup_logging("DEBUG" if args.verbose else "INFO", json_logs=json_logs)
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as e:
        err(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
