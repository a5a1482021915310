"""`cxrnode exports …`, `cxrnode reanalyze` and `cxrnode worker`: the analysis half of the command line."""

from __future__ import annotations

import argparse
import os
from typing import Any

from node.cli.common import actor, admin_service, config_path, err, open_store, out, print_rows
from node.runtime.config import load_settings


def cmd_exports_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    # state: pending | sent (stored, no commitment asked) | committing | committed | dead
    rows = [
        {
            "id": e.id,
            "instance": e.instance_id,
            "destination": e.destination_ae,
            "kind": e.kind,
            "state": e.state,
            "node": e.node,
            "attempts": e.attempts,
            "next_attempt_at": e.next_attempt_at,
            "sent_at": e.sent_at,
            "committed_at": e.committed_at,
            "last_error": e.last_error,
            "sop_instance_uid": e.sop_instance_uid,
            "file": e.file_path,
        }
        for e in store.list_exports(args.instance, state=args.state)
    ]
    print_rows(
        rows,
        args.format,
        None
        if args.format != "table"
        else [
            "id",
            "instance",
            "destination",
            "kind",
            "state",
            "node",
            "attempts",
            "next_attempt_at",
            "committed_at",
            "last_error",
        ],
    )
    return 0


def cmd_exports_retry(args: argparse.Namespace) -> int:
    from node.admin.service import AdminError

    if not args.ids and not args.all_dead:
        err("give export ids or --all-dead")
        return 1
    admin = admin_service(args)
    try:
        out(
            admin.retry_all_dead(actor=actor()) if args.all_dead else admin.retry_exports(list(args.ids), actor=actor())
        )
    except AdminError as e:
        err(str(e))
        return 1
    return 0


def cmd_reanalyze(args: argparse.Namespace) -> int:
    from node.admin.service import AdminError

    try:
        out(admin_service(args).rerun(args.instance, actor=actor()))
    except AdminError as e:
        err(str(e))
        return 1
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Replace this process with an inference worker on the configured broker (a GPU host, say).

    Refuses a configuration without `broker.url`: the embedded broker's worker is started by
    `cxrnode serve` itself, and a separate worker on a local SQLite file would never get work.
    """

    path = config_path(args)
    settings = load_settings(path)
    if settings.embedded:
        err(
            f"no broker configured: broker.url is empty in {path or 'the built-in defaults (no file found)'} "
            "and CXRNODE_BROKER__URL is not set; a separate worker needs the node's broker "
            "(e.g. redis://host:6379/0). The embedded broker's worker is started by `cxrnode serve`."
        )
        return 1
    from node.analysis.pipeline import inference_worker_command

    argv, env = inference_worker_command(
        settings, concurrency=args.concurrency, pool=args.pool, hostname=args.hostname or ""
    )
    os.execve(argv[0], argv, {**os.environ, **env})
    return 0  # not reached


def cmd_web(args: argparse.Namespace) -> int:
    from node.web.server import main as web_main

    path = config_path(args)
    return web_main([*(["--config", str(path)] if path else []), *(["--port", str(args.port)] if args.port else [])])


def cmd_hash_password(args: argparse.Namespace) -> int:
    from node.web.auth import main as auth_main

    return auth_main(["hash-password", *(["--stdin"] if args.stdin else [])])


def register(sub: Any, common: argparse.ArgumentParser, fmt: argparse.ArgumentParser) -> None:
    exports = sub.add_parser("exports", help="result deliveries (SEG/SR/overlay) and the dead letter").add_subparsers(
        dest="exports_command", required=True
    )
    p = exports.add_parser("list", parents=[common, fmt], help="list exports")
    p.add_argument(
        "--state",
        choices=["pending", "sent", "committing", "committed", "dead"],
        help="sent: stored, no commitment asked; committing: stored, commitment asked, no report yet",
    )
    p.add_argument("--instance", type=int, help="instance id")
    p.set_defaults(func=cmd_exports_list)
    p = exports.add_parser("retry", parents=[common], help="send dead exports again")
    p.add_argument("ids", type=int, nargs="*", help="export ids")
    p.add_argument("--all-dead", action="store_true", help="every export in state dead")
    p.set_defaults(func=cmd_exports_retry)

    p = sub.add_parser("reanalyze", parents=[common], help="run the models again on a stored instance")
    p.add_argument("instance", type=int, help="instance id (cxrnode audit study UID lists them)")
    p.set_defaults(func=cmd_reanalyze)

    p = sub.add_parser("worker", parents=[common], help="run an inference worker (needs cxr-node[worker])")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    p.add_argument(
        "--hostname",
        "-n",
        help="Celery node name, e.g. gpu0@%%h (default celery@%%h): give each worker on one host its own",
    )
    p.set_defaults(func=cmd_worker)

    web = sub.add_parser("web", help="the web console on its own (no DICOM listener), and its tools")
    web_sub = web.add_subparsers(dest="web_command")
    web.add_argument("--port", type=int, help="override web.port")
    web.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML configuration file")
    web.set_defaults(func=cmd_web)
    p = web_sub.add_parser("hash-password", help="print a password hash for web.password_hash or a [[web.users]] entry")
    p.add_argument(
        "--stdin",
        action="store_true",
        help="read the password as one line from stdin, no prompt (the default when stdin is no terminal)",
    )
    p.set_defaults(func=cmd_hash_password)
