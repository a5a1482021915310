"""`cxrnode exports …`, `cxrnode reanalyze` and `cxrnode worker`: the analysis half of the command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from node.config import Settings, load_settings


def cmd_exports_list(args: argparse.Namespace) -> int:
    from node.cli import _print_rows, _store

    store = _store(args)
    rows = [{"id": e.id, "instance": e.instance_id, "destination": e.destination_ae, "kind": e.kind,
             "state": e.state, "node": e.node, "attempts": e.attempts, "next_attempt_at": e.next_attempt_at,
             "last_error": e.last_error, "sop_instance_uid": e.sop_instance_uid, "file": e.file_path}
            for e in store.list_exports(args.instance, state=args.state)]
    _print_rows(rows, args.format, None if args.format != "table" else
                ["id", "instance", "destination", "kind", "state", "node", "attempts", "next_attempt_at",
                 "last_error"])
    return 0


def cmd_exports_retry(args: argparse.Namespace) -> int:
    from node.cli import _actor, _err, _out, _store
    from node.exporter import retry_exports

    store = _store(args)
    ids = [e.id for e in store.list_exports(state="dead")] if args.all_dead else list(args.ids)
    if not ids:
        _err("no dead exports" if args.all_dead else "give export ids or --all-dead")
        return 1
    n = retry_exports(store, ids, actor=_actor())
    _out(f"{n} export(s) due again (the node holding their files sends them within seconds)")
    return 0 if n else 1


def cmd_reanalyze(args: argparse.Namespace) -> int:
    from node.audit import InstanceState, StoreError
    from node.cli import _actor, _err, _out, _store

    store = _store(args)
    try:
        store.set_instance_state(args.instance, InstanceState.QUEUED, "re-analysis requested", actor=_actor())
    except StoreError as e:
        _err(str(e))
        return 1
    _out(f"instance {args.instance} queued again (the node that received it publishes it within seconds)")
    return 0


def worker_argv(settings: Settings, concurrency: int, pool: str,
                hostname: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The celery command line and environment of an inference worker; `hostname` is Celery's node
    name (`%h` = host name): two workers on one host need different ones, or Celery sees one node."""
    from workers.api import BROKER_ENV, INFERENCE_QUEUE, LEASE_ENV, RESULT_BACKEND_ENV, TIME_LIMIT_ENV

    argv = [sys.executable, "-m", "celery", "-A", "workers.tasks", "worker", "-Q", INFERENCE_QUEUE,
            "-c", str(concurrency), "--pool", pool, "--loglevel", "INFO",
            *(["--hostname", hostname] if hostname else [])]
    env = {BROKER_ENV: settings.broker_url, RESULT_BACKEND_ENV: settings.broker.result_backend,
           TIME_LIMIT_ENV: str(settings.broker.task_time_limit), LEASE_ENV: str(settings.broker.lease_s)}
    return argv, env


def cmd_worker(args: argparse.Namespace) -> int:
    """Replace this process with an inference worker on the configured broker (a GPU host, say).

    Refuses a configuration without `broker.url`: the embedded broker's worker is started by
    `cxrnode serve` itself, and a separate worker on a local SQLite file would never get work.
    """
    from node.cli import _config_path, _err

    path = _config_path(args)
    settings = load_settings(path)
    if settings.embedded:
        _err(f"no broker configured: broker.url is empty in {path or 'the built-in defaults (no file found)'} "
             "and CXRNODE_BROKER__URL is not set; a separate worker needs the node's broker "
             "(e.g. redis://host:6379/0). The embedded broker's worker is started by `cxrnode serve`.")
        return 1
    argv, env = worker_argv(settings, args.concurrency, args.pool, args.hostname)
    os.execve(argv[0], argv, {**os.environ, **env})
    return 0  # not reached


def cmd_web(args: argparse.Namespace) -> int:
    from node.cli import _config_path
    from node.web.server import main as web_main

    path = _config_path(args)
    return web_main([*(["--config", str(path)] if path else []),
                     *(["--port", str(args.port)] if args.port else [])])


def cmd_hash_password(args: argparse.Namespace) -> int:
    from node.web.auth import main as auth_main

    return auth_main(["hash-password", *(["--stdin"] if args.stdin else [])])


def register(sub: Any, common: argparse.ArgumentParser, fmt: argparse.ArgumentParser) -> None:
    exports = sub.add_parser("exports", help="result deliveries (SEG/SR/overlay) and the dead letter") \
        .add_subparsers(dest="exports_command", required=True)
    p = exports.add_parser("list", parents=[common, fmt], help="list exports")
    p.add_argument("--state", choices=["pending", "sent", "dead"])
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
    p.add_argument("--hostname", "-n", help="Celery node name, e.g. gpu0@%%h (default celery@%%h): give each "
                                           "worker on one host its own")
    p.set_defaults(func=cmd_worker)

    web = sub.add_parser("web", help="the web console on its own (no DICOM listener), and its tools")
    web_sub = web.add_subparsers(dest="web_command")
    web.add_argument("--port", type=int, help="override web.port")
    web.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML configuration file")
    web.set_defaults(func=cmd_web)
    p = web_sub.add_parser("hash-password", help="print a password hash for web.password_hash or a [[web.users]] entry")
    p.add_argument("--stdin", action="store_true",
                   help="read the password as one line from stdin, no prompt (the default when stdin is no terminal)")
    p.set_defaults(func=cmd_hash_password)
