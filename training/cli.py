"""`python -m training train|evaluate|export|...` — small commands with main(argv)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from training.tasks import TASKS, shared_data_root

log = logging.getLogger(__name__)

RUNS = Path(__file__).resolve().parents[1] / "runs"


def _folders(values: Sequence[str] | None, default: Sequence[str]) -> list[Path]:
    root = shared_data_root()
    return [Path(v) for v in values] if values else [root / d for d in default]


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train
    from workers.models import SPECS

    task = TASKS[args.task]
    spec = SPECS[args.task]
    if args.arch or args.encoder or args.input_size:
        spec = replace(spec, arch=args.arch or spec.arch, encoder=args.encoder or spec.encoder,
                       input_size=args.input_size or spec.input_size)
    cfg = TrainConfig(
        spec=spec, structures=task.structures, data=_folders(args.data, task.data),
        negatives=_folders(args.negatives, task.negatives) if (args.negatives or task.negatives) else [],
        negatives_per_source=task.negatives_per_source if args.negatives_per_source is None
        else args.negatives_per_source,
        run_dir=Path(args.run or RUNS / args.task), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_fraction=args.val_fraction, seed=args.seed, patience=args.patience, max_minutes=args.max_minutes,
        max_steps=args.max_steps, limit=args.limit, augment=not args.no_augment, threads=args.threads)
    train(cfg, resume=args.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model into runs/<task>/ (checkpoint every epoch)")
    t.add_argument("task", choices=sorted(TASKS))
    t.add_argument("--data", nargs="+", help="shared-format folders with masks (default: the task's)")
    t.add_argument("--negatives", nargs="*", help="folders free of the structure (all-zero masks)")
    t.add_argument("--negatives-per-source", type=int, default=None)
    t.add_argument("--run", help="run directory (default runs/<task>)")
    t.add_argument("--resume", action="store_true", help="continue from <run>/last.pt")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--patience", type=int, default=4)
    t.add_argument("--max-minutes", type=float, default=0.0, help="stop before an epoch that would overrun")
    t.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0 = full epochs)")
    t.add_argument("--limit", type=int, default=0, help="use only the first N samples")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--arch")
    t.add_argument("--encoder")
    t.add_argument("--input-size", type=int)
    t.set_defaults(func=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    rc: int = args.func(args)
    return rc
