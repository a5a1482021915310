"""`python -m training train|evaluate|export|...` — small commands with main(argv)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.tasks import TASKS, shared_data_root

if TYPE_CHECKING:
    from training.train import TrainConfig

log = logging.getLogger(__name__)

RUNS = Path(__file__).resolve().parents[1] / "runs"


def _folders(values: Sequence[str] | None, default: Sequence[str]) -> list[Path]:
    root = shared_data_root()
    return [Path(v) for v in values] if values else [root / d for d in default]


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import train

    train(train_config(args), resume=args.resume)
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run that `train` would make of these arguments (also what `pack` packs for)."""
    from training.train import TrainConfig, init_input_size
    from workers.models import SPECS

    task = TASKS[args.task]
    spec = SPECS[args.task]
    input_size = args.input_size or (init_input_size(args.init) if args.init else None)
    if input_size and not args.input_size and input_size != spec.input_size:
        log.info("input size %d: the size the --init weights were trained at (--input-size overrides)", input_size)
    if args.arch or args.encoder or input_size:
        spec = replace(
            spec,
            arch=args.arch or spec.arch,
            encoder=args.encoder or spec.encoder,
            input_size=input_size or spec.input_size,
        )
    return TrainConfig(
        spec=spec,
        structures=task.structures,
        data=_folders(args.data, task.data),
        # `--negatives` with no folder means none (e.g. a full SIIM set has its own negatives).
        negatives=[Path(n) for n in args.negatives]
        if args.negatives is not None
        else [shared_data_root() / d for d in task.negatives],
        negatives_per_source=task.negatives_per_source
        if args.negatives_per_source is None
        else args.negatives_per_source,
        negatives_where=dict(w.split("=", 1) for w in args.negatives_where or []),
        run_dir=Path(args.run or RUNS / args.task),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        seed=args.seed,
        split_seed=args.split_seed,
        patience=args.patience,
        max_minutes=args.max_minutes,
        epoch_images=args.epoch_images,
        max_steps=args.max_steps,
        limit=args.limit,
        augment=not args.no_augment,
        threads=args.threads,
        workers=args.workers,
        device=args.device,
        init=args.init or "",
        weak_data=[Path(w) for w in args.weak_data]
        if args.weak_data is not None
        else [shared_data_root() / d for d in task.weak_data],
        weak_train_folds=tuple(args.weak_train_folds),
        weak_val_folds=tuple(args.weak_val_folds),
        weak_weight=args.weak_weight,
        extent_weight=args.extent_weight,
        select_by=args.select_by,
        positive_repeat=args.positive_repeat,
    )


def _command_line(argv: Sequence[str]) -> str:
    return "python -m training " + shlex.join(argv)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from training.evaluate import evaluate_segmentation
    from training.severity_eval import evaluate_severity

    torch.set_num_threads(args.threads)
    weights_dir = Path(args.weights_dir) if args.weights_dir else None
    if args.model == "extent":
        from training.ralo import evaluate_extent

        out = Path(args.out or RUNS / "eval" / "extent")
        summary = evaluate_extent(
            _folders(args.data, ["severity_ralo"])[0],
            out,
            folds=args.folds,
            weights_dir=weights_dir,
            lung_checkpoint=_path(args.lung_checkpoint),
            opacity_checkpoint=_path(args.opacity_checkpoint),
            tta=_tta(args),
        )
        _stamp(out, summary, args.argv)
        return 0
    if args.model == "severity-rules":
        from training.severity_rules import evaluate_rules

        out = Path(args.out or RUNS / "eval" / "severity_rules")
        summary = evaluate_rules(
            _folders(args.data, ["severity"])[0],
            out,
            folds=args.folds or [3, 4],
            normals=[Path(n) for n in args.normals or []],
            normals_where=dict(w.split("=", 1) for w in args.normals_where or []),
            normals_split=_path(args.normals_split),
            weights_dir=weights_dir,
            lung_checkpoint=_path(args.lung_checkpoint),
            opacity_checkpoint=_path(args.opacity_checkpoint),
        )
        _stamp(out, summary, args.argv)
        return 0
    if args.model == "severity":
        folders = _folders(args.data, ["severity"])
        out = Path(args.out or RUNS / "eval" / "severity")
        for folder in folders:
            summary = evaluate_severity(
                folder,
                out if len(folders) == 1 else out / folder.name,
                weights_dir=weights_dir,
                lung_checkpoint=_path(args.lung_checkpoint),
                opacity_checkpoint=_path(args.opacity_checkpoint),
                lung_split=_path(args.lung_split),
                pixel_thresholds=args.opacity_thresholds or (),
                folds=args.folds,
                normals=[Path(n) for n in args.normals or []],
                normals_split=_path(args.normals_split),
                tta=_tta(args),
            )
            _stamp(out if len(folders) == 1 else out / folder.name, summary, args.argv)
        return 0
    task = TASKS[args.model]
    out = Path(args.out or RUNS / "eval" / args.model)
    summary = evaluate_segmentation(
        args.model,
        _folders(args.data, task.data),
        out,
        weights_dir=weights_dir,
        checkpoint=_path(args.checkpoint),
        split_file=_path(args.split),
        subset=args.subset,
        negatives=[Path(n) for n in args.negatives or []],
        threshold=args.threshold,
        presence_threshold=args.presence_threshold,
        max_per_source=args.max_per_source,
        tta_names=_tta(args).get(args.model),
    )
    _stamp(out, summary, args.argv)
    return 0


def _add_tta_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta",
        nargs="+",
        metavar="TRANSFORM",
        help="test-time augmentation instead of the cards' `tta` (workers.tta): identity first, then "
        "e.g. gamma:0.8 scale:1.1 shift:0.03:0; `--tta identity` = none",
    )
    parser.add_argument(
        "--tta-models",
        nargs="+",
        choices=sorted(TASKS),
        help="apply --tta only to these models (default: every model the command runs)",
    )


def _tta(args: argparse.Namespace) -> dict[str, list[str]]:
    """Model name -> --tta transforms, for the models --tta-models names (default all)."""
    if not args.tta:
        return {}
    return {name: list(args.tta) for name in (args.tta_models or TASKS)}


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _stamp(out: Path, summary: dict[str, Any], argv: Sequence[str]) -> None:
    """Record the command that produced a summary inside it (model cards quote it)."""
    summary["command"] = _command_line(argv)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


def cmd_choose(args: argparse.Namespace) -> int:
    from training.choose import choose

    summary = choose([Path(v) for v in args.variants], args.metric, args.lower_is_better, args.tie)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _stamp(out, summary, args.argv)
    gain = summary["report_gain"]
    log.info(
        "chosen %s; on the report half vs %s: source mean %+.4f, %d images better, %d worse",
        summary["chosen"],
        summary["baseline"],
        gain["source_mean"],
        gain["images_better"],
        gain["images_worse"],
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import NotBetterError, export
    from workers.models import WEIGHTS_DIR

    evaluation = Path(args.evaluation)
    extra: dict[str, Any] = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value) if value[:1] in '-0123456789[{tfn"' else value
    for item in args.attach or []:
        key, _, path = item.partition("=")
        extra[key] = json.loads(Path(path).read_text())
    command = json.loads(evaluation.read_text()).get("command", "(not recorded)")
    try:
        export(
            args.model,
            Path(args.checkpoint),
            evaluation,
            command,
            status=args.status,
            limitations=args.limitation or [],
            extra=extra,
            primary_metric=args.primary_metric,
            weights_dir=Path(args.weights_dir) if args.weights_dir else WEIGHTS_DIR,
            force=args.force,
            baseline=_path(args.baseline),
        )
    except NotBetterError as e:
        log.warning("%s", e)
        return 3
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    from training.campaign import load_recipe, run_campaign

    recipe = load_recipe(Path(args.recipe))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run_campaign(recipe, out, shared_data_root(), parallel=args.parallel)
    log.info("campaign: %d jobs in %.0f s, failed: %s", len(result["jobs"]), result["total_wall_s"], result["failed"])
    return 1 if result["failed"] else 0


def cmd_pack(args: argparse.Namespace) -> int:
    from training.campaign import load_recipe
    from training.pack import pack

    parser = build_parser()
    out = Path(args.out)
    result = pack(
        load_recipe(Path(args.recipe)),
        lambda argv: train_config(parser.parse_args(["train", *argv])),
        shared_data_root(),
        out,
        args.jpeg_quality,
    )
    mib = result["bytes"] / 2**20
    log.info("pack: %.1f MiB in %s; carry besides it: %s", mib, out, result["carry"] or "nothing")
    if args.max_mib and mib > args.max_mib:
        log.error(
            "pack: %.1f MiB is over --max-mib %.0f: fewer jobs, smaller inputs or a lower --jpeg-quality",
            mib,
            args.max_mib,
        )
        return 1
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    from training.soup import make_soup

    weights = args.weights or [1.0] * len(args.ingredients)
    make_soup(args.model, args.ingredients, weights, Path(args.out), _path(args.weights_dir))
    return 0


#: `train` options that `crossval` chooses per fold (the protocol), so they may not follow `--`.
FOLD_OWNED = {"--run", "--weak-data", "--weak-train-folds", "--weak-val-folds"}


def cmd_crossval(args: argparse.Namespace) -> int:
    from training.crossval import FoldTrainingError, evaluate_folds, plan, run_folds
    from training.predict import Segmenter
    from workers.models import SPECS

    plans = [p for p in plan(args.folds) if not args.only or p.test in args.only]
    if not plans:
        raise ValueError(f"--only {args.only}: no such test fold among {args.folds}")
    root = Path(args.run or RUNS / "opacity_cv")
    weak_data = Path(args.data) if args.data else shared_data_root() / "severity"
    owned = sorted({a.split("=")[0] for a in args.passthrough} & FOLD_OWNED)
    if owned:
        raise ValueError(f"crossval sets {', '.join(owned)} for each fold itself: leave them out after --")
    # The fold runs' own arguments, checked here rather than five times over in the fold processes.
    fold_args = build_parser().parse_args(["train", args.model, *args.passthrough])
    if not args.evaluate_only:
        try:
            run_folds(
                plans,
                root,
                weak_data,
                args.passthrough,
                parallel=args.parallel,
                input_size=fold_args.input_size or SPECS[args.model].input_size,
            )
        except FoldTrainingError as e:
            log.error("%s", e)
            return 2
    if args.train_only:
        return 0
    lung = Segmenter.load("lung", Path(args.weights_dir) if args.weights_dir else None, _path(args.lung_checkpoint))
    _stamp(root, evaluate_folds(plans, root, weak_data, lung), args.argv)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from training.calibrate import calibrate_presence

    torch.set_num_threads(args.threads)
    task = TASKS[args.model]
    out = Path(args.out or RUNS / "calibrate" / args.model)
    summary = calibrate_presence(
        _folders(args.data, task.data),
        [Path(n) for n in args.negatives],
        out,
        split_files=[Path(s) for s in args.trained_on or []],
        target=args.false_alarm_rate,
        weights_dir=Path(args.weights_dir) if args.weights_dir else None,
        checkpoint=_path(args.checkpoint),
        report_only=args.report_only,
        max_per_group=args.max_per_source,
        compare=args.compare or (),
        tta_names=_tta(args).get(args.model),
    )
    _stamp(out, summary, args.argv)
    return 0


def cmd_import_siim(args: argparse.Namespace) -> int:
    from training.siim import import_siim

    n = import_siim(Path(args.rle), Path(args.images), Path(args.out), limit=args.limit)
    return 0 if n else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model into runs/<task>/ (checkpoint every epoch)")
    t.add_argument("task", choices=sorted(TASKS))
    t.add_argument("--data", nargs="+", help="shared-format folders with masks (default: the task's)")
    t.add_argument("--negatives", nargs="*", help="folders free of the structure (all-zero masks)")
    t.add_argument("--negatives-per-source", type=int, default=None)
    t.add_argument(
        "--negatives-where",
        nargs="+",
        metavar="COLUMN=VALUE",
        help="only negatives rows with this index value, e.g. class=Normal (covid_opacity_negatives)",
    )
    t.add_argument("--run", help="run directory (default runs/<task>)")
    t.add_argument("--resume", action="store_true", help="continue from <run>/last.pt")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--split-seed",
        type=int,
        help="seed of the split and the negatives draw (default --seed): reruns with other --seed values "
        "then train and are scored on the same images",
    )
    t.add_argument("--patience", type=int, default=4)
    t.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="training time budget; the cosine schedule follows it (0 = schedule by --epochs)",
    )
    t.add_argument(
        "--epoch-images",
        type=int,
        default=0,
        help="images per epoch (0 = one pass; more than the set = several passes): checkpoint and validation cadence",
    )
    t.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0 = full epochs)")
    t.add_argument("--limit", type=int, default=0, help="use only the first N samples")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader processes for augmentation (0 = in the training process; use the cores on a GPU)",
    )
    t.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto = CUDA when available (mixed precision), else CPU",
    )
    t.add_argument(
        "--weak-data",
        nargs="*",
        help="severity-format folders for the weak zone loss, "
        "severity_ralo-format ones for the per-lung extent loss "
        "(default: the task's; no folder = none)",
    )
    t.add_argument("--weak-train-folds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument(
        "--weak-val-folds",
        nargs="+",
        type=int,
        default=[3],
        help="weak-label folds for validation; folds in neither list are never read (test)",
    )
    t.add_argument("--weak-weight", type=float, default=1.0)
    t.add_argument(
        "--extent-weight",
        type=float,
        default=1.0,
        help="weight of the per-lung extent loss of severity_ralo-format --weak-data folders",
    )
    t.add_argument(
        "--select-by",
        choices=["images", "sources"],
        default="images",
        help="best.pt follows the validation Dice over images, or the mean of the per-source Dice",
    )
    t.add_argument(
        "--positive-repeat",
        type=int,
        default=1,
        help="draw each image with a labelled structure N times per pass (few positives, many negatives)",
    )
    t.add_argument(
        "--init",
        help="start from a checkpoint (*.pt) or a shipped model name (e.g. lung); another task's weights "
        "fill all but the heads it lacks",
    )
    t.add_argument("--arch")
    t.add_argument("--encoder")
    t.add_argument("--input-size", type=int, help="default: the --init weights' size, else the task's")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="Dice/IoU/HD95 per image + summary; `severity` for labels.csv folders")
    e.add_argument(
        "model",
        choices=[*sorted(TASKS), "severity", "severity-rules", "extent"],
        help="severity: 0-6 zone score on labels.csv folders; severity-rules: the shipped zone "
        "rule against per-row/per-zone/soft alternatives, each fitted on one of --folds and scored "
        "on the others; extent: RALO per-lung geographic extent 0-4 (severity_ralo/) MAE, e.g. on "
        "held-out --folds 4",
    )
    e.add_argument("--data", nargs="+", help="shared-format folders (default: the task's)")
    e.add_argument("--negatives", nargs="*", help="folders free of the structure (pneumothorax)")
    e.add_argument("--checkpoint", help="evaluate a training checkpoint instead of the shipped weights")
    e.add_argument("--lung-checkpoint")
    e.add_argument("--opacity-checkpoint")
    e.add_argument(
        "--opacity-thresholds",
        nargs="*",
        type=float,
        help="severity: also tune the opacity pixel threshold over these values (e.g. 0.3 0.5 0.7)",
    )
    e.add_argument(
        "--lung-split",
        help="severity: the lung run's split.json, to report images whose lung "
        "mask the lung model did not train on separately",
    )
    e.add_argument(
        "--folds",
        nargs="+",
        type=int,
        help="severity: only these folds (those a weakly supervised opacity model never saw); "
        "each fold's zone threshold is tuned on the others",
    )
    e.add_argument(
        "--normals",
        nargs="*",
        help="severity: folders free of COVID opacity (e.g. lung/jsrt): report the zones called on them (false alarms)",
    )
    e.add_argument("--normals-split", help="severity: only the --normals images this run did not train on")
    e.add_argument(
        "--normals-where",
        nargs="*",
        help="severity-rules: only --normals rows with these index.csv values (e.g. class=Normal)",
    )
    e.add_argument("--weights-dir", help="exported weights + cards (default workers/weights)")
    e.add_argument("--split", help="split.json of a run: evaluate only its --subset images")
    e.add_argument(
        "--subset",
        default="validation",
        choices=["train", "validation", "heldout"],
        help="heldout = every image the run did not train on",
    )
    e.add_argument("--max-per-source", type=int, default=0, help="at most N images per source folder")
    e.add_argument("--threads", type=int, default=2)
    _add_tta_arguments(e)
    e.add_argument("--threshold", type=float)
    e.add_argument("--presence-threshold", type=float)
    e.add_argument("--out", help="output folder (default runs/eval/<model>)")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="fp16 safetensors + model card into workers/weights/")
    x.add_argument("model", choices=sorted(TASKS))
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--evaluation", required=True, help="summary.json written by `evaluate`")
    x.add_argument("--status", choices=["validated", "experimental"], default="experimental")
    x.add_argument("--limitation", action="append", help="a known weakness (repeatable)")
    x.add_argument("--set", action="append", help="extra card field KEY=VALUE (JSON values allowed)")
    x.add_argument("--attach", action="append", help="extra card field KEY=path/to/file.json")
    x.add_argument("--primary-metric", default="overall.dice", help="dotted key in the evaluation (higher=better)")
    x.add_argument("--weights-dir")
    x.add_argument("--force", action="store_true", help="replace shipped weights even if not better")
    x.add_argument(
        "--baseline",
        help="summary.json of the shipped weights under the same evaluation command: compared on the "
        "primary metric instead of the shipped card's own figure (needed for a new metric or data)",
    )
    x.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "crossval",
        help="k-fold CV of the opacity model's weak training by severity/ `fold`",
        description="Trains one opacity model per test fold (fold k-1 selects, the rest train) "
        "and pools their predictions. Arguments after `--` go to `train`, e.g. "
        "`crossval opacity --parallel 5 -- --max-minutes 5 --workers 2`.",
    )
    c.add_argument("model", choices=["opacity"])
    c.add_argument("--folds", type=int, default=5, help="number of folds in the `fold` column")
    c.add_argument("--only", nargs="+", type=int, help="only these test folds")
    c.add_argument("--parallel", type=int, default=1, help="folds trained at once (a GPU holds several)")
    c.add_argument("--data", help="severity-format folder (default: the shared severity/)")
    c.add_argument("--run", help="folder of the fold runs (default runs/opacity_cv)")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--evaluate-only", action="store_true", help="evaluate the fold runs already there")
    mode.add_argument(
        "--train-only",
        action="store_true",
        help="train the folds and stop (evaluate later with --evaluate-only, e.g. on another machine)",
    )
    c.add_argument("--lung-checkpoint", help="lung model for the zones (default: the shipped one)")
    c.add_argument("--weights-dir", help="exported weights + cards (default workers/weights)")
    c.set_defaults(func=cmd_crossval)

    k = sub.add_parser(
        "calibrate",
        help="pneumothorax presence threshold for a target false-alarm rate, "
        "chosen on calibration negatives, scored per source on test images",
        description="Leaves out every image the --trained-on runs trained on; COVID-QU-Ex folders "
        "(source_split column): Train calibrates, Val tests; other folders by a patient "
        "hash. See training/calibrate.py.",
    )
    k.add_argument("model", choices=["pneumothorax"])
    k.add_argument("--data", nargs="+", help="folders with positives (default: the task's)")
    k.add_argument("--negatives", nargs="+", required=True, help="folders free of pneumothorax")
    k.add_argument(
        "--trained-on",
        nargs="+",
        metavar="SPLIT_JSON",
        help="split.json of every run behind the weights (their train images are left out)",
    )
    k.add_argument("--false-alarm-rate", type=float, default=0.02, help="target per source (default 0.02)")
    k.add_argument(
        "--report-only",
        nargs="*",
        default=["covid_opacity_negatives:Non-COVID"],
        help="groups (folder or folder:class) tested and reported apart, never calibrated on",
    )
    k.add_argument("--compare", nargs="*", type=float, help="also score the test images at these thresholds")
    k.add_argument("--checkpoint", help="a training checkpoint instead of the shipped weights")
    k.add_argument("--weights-dir", help="exported weights + cards (default workers/weights)")
    k.add_argument("--max-per-source", type=int, default=0, help="at most N negatives per group and role")
    k.add_argument("--threads", type=int, default=2)
    _add_tta_arguments(k)
    k.add_argument("--out", help="output folder (default runs/calibrate/<model>)")
    k.set_defaults(func=cmd_calibrate)

    g = sub.add_parser(
        "campaign",
        help="a recipe's trainings side by side (one GPU lease), each evaluated; small files out",
        description="See training/campaign.py and training/recipes/. Data: $CXR_SHARED_DATA or ../shared/data.",
    )
    g.add_argument("recipe", help="TOML recipe, e.g. training/recipes/gpu15.toml")
    g.add_argument("--out", required=True, help="folder of the job runs and campaign.json")
    g.add_argument("--parallel", type=int, default=0, help="trainings at once (default: all)")
    g.set_defaults(func=cmd_campaign)

    q = sub.add_parser(
        "pack",
        help="the samples a recipe's trainings read, at their input sizes, small enough to carry to a lent GPU",
        description="See training/pack.py. Writes OUT/<job>/..., OUT/recipe.toml (run it with "
        "CXR_SHARED_DATA=OUT) and OUT/pack.json (bytes, files to carry, evaluations to run after).",
    )
    q.add_argument("recipe", help="TOML recipe, e.g. training/recipes/gpu15.toml")
    q.add_argument("--out", required=True, help="pack folder (replaced)")
    q.add_argument("--jpeg-quality", type=int, default=90, help="0 stores PNG (lossless, about 2x larger)")
    q.add_argument("--max-mib", type=float, default=0, help="exit 1 when the pack is larger (0: no limit)")
    q.set_defaults(func=cmd_pack)

    u = sub.add_parser(
        "soup",
        help="weighted mean of checkpoints of one architecture (e.g. shipped + a fine-tune) -> a checkpoint",
    )
    u.add_argument("model", choices=sorted(TASKS))
    u.add_argument("ingredients", nargs="+", help="checkpoint paths, or `shipped` for the exported weights")
    u.add_argument("--weights", nargs="+", type=float, help="one per ingredient (default: equal)")
    u.add_argument("--weights-dir", help="exported weights + cards (default workers/weights)")
    u.add_argument("--out", required=True, help="checkpoint to write, e.g. runs/lung_v3/soup50.pt")
    u.set_defaults(func=cmd_soup)

    h = sub.add_parser(
        "choose",
        help="pick among `evaluate` outputs of one model (e.g. --tta variants) on half the images, "
        "report on the other half",
        description="See training/choose.py. The first variant is the baseline; list the cheapest first.",
    )
    h.add_argument("variants", nargs="+", help="evaluate output folders (per_image.csv) on the same images")
    h.add_argument("--metric", default="dice", help="per_image.csv column (default dice)")
    h.add_argument("--lower-is-better", action="store_true", help="e.g. for hd95_px")
    h.add_argument("--tie", type=float, default=0.0005, help="a later variant must win by more than this")
    h.add_argument("--out", required=True, help="folder for summary.json")
    h.set_defaults(func=cmd_choose)

    s = sub.add_parser("import-siim", help="SIIM-ACR train-rle.csv + images -> shared folder format")
    s.add_argument("--rle", required=True)
    s.add_argument("--images", required=True, help="folder with <ImageId>.dcm/.png (searched recursively)")
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=0)
    s.set_defaults(func=cmd_import_siim)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `crossval ... -- TRAIN ARGS`: what follows `--` is handed to each fold's `train` as it stands.
    own, passthrough = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    if passthrough and args.command != "crossval":
        parser.error(f"arguments after -- are for crossval only: {' '.join(passthrough)}")
    args.passthrough = passthrough
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc: int = args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad arguments or data: say so, no traceback
        log.error("%s", e)
        log.debug("where it was raised", exc_info=True)  # -v shows the traceback
        return 2
    return rc
