"""The `cxrnode` command: serve, config check, audit queries and AE title administration.

Every command finds its configuration like a service (`node.config.find_config`: --config,
$CXRNODE_CONFIG, /etc/cxrnode/cxrnode.toml). Administrative commands (audit, ae, exports,
reanalyze) only open an audit database a node has already made: an admin command that silently
created a fresh one would report "(none)" or add an AE title that the running node never sees.

Exit status: 0 success, 1 failure (bad configuration, failed echo, unknown study), 2 usage errors.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.config import CONFIG_SEARCH, ConfigError, Settings, find_config, load_settings

log = logging.getLogger(__name__)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _since(value: str) -> datetime:
    """ISO date or date-time; naive values are UTC."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {value!r}") from e
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _config_path(args: argparse.Namespace) -> Path | None:
    return find_config(getattr(args, "config", None))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


def _print_rows(rows: list[dict[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> None:
    cols = list(columns or (rows[0].keys() if rows else []))
    if fmt == "json":
        _out(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
    else:
        if not rows:
            _out("(none)")
            return
        cells = [[str(r.get(c, "")) if not isinstance(r.get(c), dict) else json.dumps(r[c]) for c in cols]
                 for r in rows]
        widths = [min(max(len(c), *(len(row[i]) for row in cells)), 64) for i, c in enumerate(cols)]
        _out("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
        for row in cells:
            _out("  ".join(v[:w].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- commands ----------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from node.serve import serve

    path = _config_path(args)
    log.info("configuration: %s", path or f"built-in defaults (no file found: looked for {CONFIG_SEARCH})")
    return serve(load_settings(path), str(path) if path else "the built-in defaults")


def cmd_config_check(args: argparse.Namespace) -> int:
    path = find_config(args.file or getattr(args, "config", None))
    if path is None:
        _err(f"no configuration file found (looked for {CONFIG_SEARCH})")
        return 1
    from node.preflight import check_start

    try:
        settings = load_settings(path)
        check_start(settings, str(path))
    except ConfigError as e:
        _err(str(e))
        return 1
    _out(f"OK: {path} (AE title {settings.dicom.ae_title}, port {settings.dicom.port}, "
         f"{len(settings.rules)} rule(s), {len(settings.ae)} AE title(s))")
    return 0


def _store(args: argparse.Namespace) -> Any:
    """The node's audit database; ConfigError (naming the configuration) when there is none yet."""
    from sqlalchemy.exc import SQLAlchemyError

    from node.audit import AuditStore
    from node.audit.db import database_exists

    path = _config_path(args)
    url = load_settings(path).database_url
    source = f"configuration {path}" if path else f"no configuration file (looked for {CONFIG_SEARCH})"
    try:
        exists = database_exists(url)
    except SQLAlchemyError as e:
        raise ConfigError(f"cannot open the audit database of {source}: {e}") from e
    if not exists:
        raise ConfigError(f"no audit database at {_redacted(url)} ({source}); an administrative command does "
                          "not create one: start `cxrnode serve` with this configuration first, or pass "
                          "--config with the node's file")
    return AuditStore.open(url)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_audit_studies(args: argparse.Namespace) -> int:
    from node.audit.report import study_row

    rows = [study_row(s) for s in _store(args).list_studies(since=args.since, calling_ae=args.ae, state=args.state,
                                                             limit=args.limit)]
    cols = None if args.format != "table" else ["study_instance_uid", "first_received", "calling_ae",
                                                 "accession_number", "instances", "states"]
    _print_rows(rows, args.format, cols)
    return 0


def cmd_audit_study(args: argparse.Namespace) -> int:
    from node.audit import InstanceFilter
    from node.audit.report import instance_row

    store = _store(args)
    if store.get_study(args.uid) is None:
        _err(f"no study {args.uid}")
        return 1
    rows = [instance_row(i) for i in store.list_instances(InstanceFilter(study_instance_uid=args.uid))]
    cols = None if args.format != "table" else ["id", "sop_instance_uid", "modality", "state", "rule", "reason",
                                                 "received_at"]
    _print_rows(rows, args.format, cols)
    return 0


def cmd_audit_events(args: argparse.Namespace) -> int:
    from node.audit.report import event_row

    events = _store(args).list_events(since=args.since, kinds=args.kind or (), calling_ae=args.ae, limit=args.limit)
    rows = [event_row(e) for e in events]
    if args.state:
        rows = [r for r in rows if r["kind"] == f"instance.{args.state}"]
    _print_rows(rows, args.format, None if args.format != "table" else
                ["id", "at", "kind", "actor", "association_id", "instance_id", "detail"])
    return 0


def cmd_ae_add(args: argparse.Namespace) -> int:
    import os

    from node.ae_admin import AdminError, add_ae

    secret = ""
    if args.secret_env:
        secret = os.environ.get(args.secret_env, "")
        if not secret:
            _err(f"error: environment variable {args.secret_env} is empty or not set")
            return 2
    elif args.secret_file:
        try:
            secret = args.secret_file.read_text().strip()
        except OSError as e:
            _err(f"error: cannot read {args.secret_file}: {e.strerror or e}")
            return 2
    try:
        row = add_ae(_store(args), args.name, host=args.host, port=args.port, role=args.role, tls=args.tls,
                     description=args.description, url=args.url, auth=args.auth, username=args.username,
                     secret=secret, actor=_actor())
    except AdminError as e:
        _err(f"error: {e}")
        return 2
    where = f"STOW-RS {row.url}, auth {row.auth}" if row.url else f"{row.host or '-'}:{row.port or '-'}"
    _out(f"added AE {row.name} ({row.role}, {where}{', TLS' if row.tls else ''})")
    return 0


def cmd_ae_list(args: argparse.Namespace) -> int:
    rows = [{"name": a.name, "host": a.host, "port": a.port, "role": a.role, "tls": a.tls, "url": a.url or "",
             "auth": a.auth if a.url else "", "description": a.description,
             "updated_at": a.updated_at.isoformat(timespec="seconds")}
            for a in _store(args).list_ae()]
    _print_rows(rows, "json" if args.json else "table",
                None if args.json else ["name", "host", "port", "role", "tls", "url", "auth", "description"])
    return 0


def cmd_ae_remove(args: argparse.Namespace) -> int:
    from node.ae_admin import AdminError, remove_ae

    try:
        remove_ae(_store(args), args.name, actor=_actor())
    except AdminError as e:
        _err(f"error: {e}")
        return 1
    _out(f"removed AE {args.name}")
    return 0


def cmd_ae_echo(args: argparse.Namespace) -> int:
    from node.ae_admin import AdminError, echo_ae

    try:
        settings = _settings(args)
        r = echo_ae(_store(args), args.name, calling_ae=settings.sender.calling_ae or settings.dicom.ae_title,
                    tls=settings.dicom.tls, timeout=args.timeout, actor=_actor())
    except AdminError as e:
        _err(f"error: {e}")
        return 1
    where = r.host if r.protocol != "C-ECHO" else f"{r.host}:{r.port}"
    _out(f"{r.protocol} {r.ae_title} at {where}: {r.detail} ({r.round_trip_ms:.1f} ms)")
    return 0 if r.ok else 1


# -- parser ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrnode", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", type=Path, default=None,
                        help="TOML configuration file (default: $CXRNODE_CONFIG, else /etc/cxrnode/cxrnode.toml "
                             "if it exists, else built-in defaults)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    # The same options after the sub-command; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS, help="TOML configuration file")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the DICOM node")
    p.set_defaults(func=cmd_serve)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="config_command", required=True)
    p = cfg.add_parser("check", parents=[common],
                       help="run every start-time check of serve on a configuration (prints OK or each problem)")
    p.add_argument("file", type=Path, nargs="?", help=f"default: {CONFIG_SEARCH}")
    p.set_defaults(func=cmd_config_check)

    fmt = argparse.ArgumentParser(add_help=False)
    g = fmt.add_mutually_exclusive_group()
    g.add_argument("--json", dest="format", action="store_const", const="json", help="JSON output")
    g.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV output")
    fmt.set_defaults(format="table")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", type=_since, help="ISO date or date-time (UTC unless given)")
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
    p.add_argument("--description", default="")
    p.add_argument("--url", help="a STOW-RS destination: the DICOMweb base URL (results are POSTed to URL/studies)")
    p.add_argument("--auth", choices=["none", "bearer", "basic"], default="none", help="STOW-RS authentication")
    p.add_argument("--username", default="", help="user name for --auth basic")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument("--secret-env", metavar="VAR",
                        help="read the bearer token / basic password from this environment variable")
    secret.add_argument("--secret-file", type=Path, metavar="FILE",
                        help="read the bearer token / basic password from this file")
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

    from node import cli_dicomweb, cli_ops, cli_triage

    cli_dicomweb.register(sub, common, fmt)
    cli_ops.register(sub, common, fmt)
    cli_triage.register(sub, common, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from node.logging_setup import setup_logging

    json_logs = False
    if args.command == "serve" and (path := _config_path(args)) is not None:
        try:
            json_logs = load_settings(path).web.json_logs
        except ConfigError:
            pass  # reported by the command itself
    # PHI-redacting handler; pynetdicom's per-PDU chatter only with --verbose.
    setup_logging("DEBUG" if args.verbose else "INFO", json_logs=json_logs)
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as e:
        _err(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
