"""What every `cxrnode` command shares: output, the actor name, the configuration, the store, tables.

Commands live in node.cli.main, node.cli.ops and node.cli.triage; they import these helpers from
here (not from each other), and do their work through node.admin and node.audit.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.admin.service import AdminService
from node.audit import AuditStore
from node.runtime.config import CONFIG_SEARCH, ConfigError, Settings, find_config, load_settings


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text + "\n")


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container without /etc/passwd entry)
        return "cli"


def since(value: str) -> datetime:
    """ISO date or date-time; naive values are UTC."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {value!r}") from e
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def config_path(args: argparse.Namespace) -> Path | None:
    return find_config(getattr(args, "config", None))


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(args))


def print_rows(rows: list[dict[str, Any]], fmt: str, columns: Sequence[str] | None = None) -> None:
    cols = list(columns or (rows[0].keys() if rows else []))
    if fmt == "json":
        out(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
    else:
        if not rows:
            out("(none)")
            return
        cells = [
            [str(r.get(c, "")) if not isinstance(r.get(c), dict) else json.dumps(r[c]) for c in cols] for r in rows
        ]
        widths = [min(max(len(c), *(len(row[i]) for row in cells)), 64) for i, c in enumerate(cols)]
        out("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
        for row in cells:
            out("  ".join(v[:w].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def open_store(args: argparse.Namespace) -> AuditStore:
    """The node's audit database; ConfigError (naming the configuration) when there is none yet."""
    from node.audit.db import DatabaseUnreachable, database_exists, redact_url

    path = config_path(args)
    settings = load_settings(path)
    url = settings.database_url
    source = f"configuration {path}" if path else f"no configuration file (looked for {CONFIG_SEARCH})"
    try:
        exists = database_exists(url)
    except DatabaseUnreachable as e:
        raise ConfigError(f"{e} ({source})") from e
    if not exists:
        raise ConfigError(
            f"no audit database at {redact_url(url)} ({source}); an administrative command does "
            "not create one: start `cxrnode serve` with this configuration first, or pass "
            "--config with the node's file"
        )
    return AuditStore.open(url, node=settings.node_name)


def admin_service(args: argparse.Namespace) -> AdminService:
    """The node's AdminService on the configured database (no running node's callables: its passes act)."""
    return AdminService.for_settings(settings_of(args), open_store(args))
