"""`cxrnode triage list` and `cxrnode alerts list|retry`: the triage half of the command line."""

from __future__ import annotations

import argparse
from typing import Any

from node.alerts.message import TRIAGE_LEVELS
from node.cli.common import actor, err, open_store, out, print_rows


def cmd_triage_list(args: argparse.Namespace) -> int:
    from node.triage.worklist import worklist_rows

    rows = worklist_rows(open_store(args), levels=args.level or (), calling_ae=args.ae, limit=args.limit)
    print_rows(
        rows,
        args.format,
        None
        if args.format != "table"
        else [
            "study_id",
            "level",
            "decided_at",
            "calling_ae",
            "accession",
            "severity",
            "change",
            "pneumothorax",
            "triggered_by",
        ],
    )
    return 0


def cmd_alerts_list(args: argparse.Namespace) -> int:
    from node.triage.worklist import alert_rows

    rows = alert_rows(open_store(args), state=args.state, study_id=args.study, limit=args.limit)
    print_rows(
        rows,
        args.format,
        None
        if args.format != "table"
        else ["id", "study_id", "destination", "kind", "level", "state", "attempts", "next_attempt_at", "last_error"],
    )
    return 0


def cmd_alerts_retry(args: argparse.Namespace) -> int:

    store = open_store(args)
    ids = store.alert_ids(state="dead") if args.all_dead else list(args.ids)
    if not ids:
        err("no dead alerts" if args.all_dead else "give alert ids or --all-dead")
        return 1
    n = store.retry_alerts(ids, actor=actor())
    out(f"{n} alert(s) due again (a running node sends them within seconds)")
    return 0 if n else 1


def register(sub: Any, common: argparse.ArgumentParser, fmt: argparse.ArgumentParser) -> None:
    triage = sub.add_parser("triage", help="the triage worklist (studies by level)").add_subparsers(
        dest="triage_command", required=True
    )
    p = triage.add_parser("list", parents=[common, fmt], help="decided studies, most pressing first")
    p.add_argument("--level", action="append", choices=TRIAGE_LEVELS, help="only this level (repeatable)")
    p.add_argument("--ae", help="calling AE title")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(func=cmd_triage_list)

    alerts = sub.add_parser("alerts", help="triage alerts (HL7, FHIR, webhook) and their dead letter").add_subparsers(
        dest="alerts_command", required=True
    )
    p = alerts.add_parser("list", parents=[common, fmt], help="list alerts, newest first")
    p.add_argument("--state", choices=["pending", "sent", "dead"])
    p.add_argument("--study", type=int, help="study id")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(func=cmd_alerts_list)
    p = alerts.add_parser("retry", parents=[common], help="send dead alerts again")
    p.add_argument("ids", type=int, nargs="*", help="alert ids")
    p.add_argument("--all-dead", action="store_true", help="every alert in state dead")
    p.set_defaults(func=cmd_alerts_retry)
