"""`cxrnode stow-token add|list|revoke`: the tokens STOW-RS sources present (node.dicomweb.tokens)."""

from __future__ import annotations

import argparse
from typing import Any

from node.cli.common import actor, err, open_store, out, print_rows


def cmd_token_add(args: argparse.Namespace) -> int:
    from node.dicomweb.tokens import TokenError, add_token

    try:
        new = add_token(open_store(args), args.source, description=args.description, actor=actor())
    except TokenError as e:
        err(f"error: {e}")
        return 2
    # The token goes to stdout alone (for scripts); the rest to stderr. It cannot be shown again.
    err(f"token {new.row.id} for source {new.row.source} (shown once; the node keeps only its hash):")
    out(new.token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:

    rows = [
        {
            "id": t.id,
            "source": t.source,
            "description": t.description,
            "created_at": t.created_at.isoformat(timespec="seconds"),
            "revoked_at": t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "",
        }
        for t in open_store(args).list_stow_tokens(include_revoked=args.all)
    ]
    print_rows(
        rows,
        args.format,
        None if args.format != "table" else ["id", "source", "description", "created_at", "revoked_at"],
    )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from node.dicomweb.tokens import TokenError, revoke_token

    try:
        row = revoke_token(open_store(args), args.id, actor=actor())
    except TokenError as e:
        err(f"error: {e}")
        return 1
    out(f"revoked token {row.id} of source {row.source}")
    return 0


def register(sub: Any, common: argparse.ArgumentParser, fmt: argparse.ArgumentParser) -> None:
    tokens = sub.add_parser("stow-token", help="STOW-RS tokens (one or more per source)").add_subparsers(
        dest="token_command", required=True
    )
    p = tokens.add_parser("add", parents=[common], help="make a token for a source; prints it once")
    p.add_argument("source", help="the source's name (an AE title: routing rules and reply-to-sender use it)")
    p.add_argument("--description", default="")
    p.set_defaults(func=cmd_token_add)
    p = tokens.add_parser("list", parents=[common, fmt], help="list tokens (never the tokens themselves)")
    p.add_argument("--all", action="store_true", help="revoked ones too")
    p.set_defaults(func=cmd_token_list)
    p = tokens.add_parser("revoke", parents=[common], help="revoke a token (its requests get 401 at once)")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_token_revoke)
