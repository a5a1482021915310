"""Export a trained checkpoint as shipped weights: fp16 safetensors + JSON model card.

The card records what a reader needs to trust (or distrust) the weights: architecture, input size
and preprocessing, thresholds, training data and split, validation metrics with the command that
produced them, status and limitations, training date, code version, machine and run time.
New weights replace shipped ones only when they beat them on the same validation metric: the shipped
card's own figure, or (`baseline`) the shipped weights scored by the same command on the same images,
which a new metric or a new validation set needs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from training.predict import load_model
from training.tasks import portable
from training.train import describe_init
from workers import models

log = logging.getLogger(__name__)

MACHINE = "2-core CPU, no GPU"
PREPROCESSING = (
    "8-bit grayscale image (as workers.models.preprocess receives it) -> PIL bilinear resize to "
    "input_size x input_size (aspect not kept) -> (x/255 - 0.5)/0.25; output probabilities are "
    "resized bilinearly to the image grid and thresholded at `threshold`"
)


class NotBetterError(RuntimeError):
    """The new model does not beat the shipped one on the same validation metric."""


def git_rev(repo: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # The code that shapes the weights: training/ and the architecture/preprocessing/zone rule.
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "status",
                "--porcelain",
                "--",
                "training",
                "workers/models.py",
                "workers/severity.py",
                "workers/inference.py",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _dig(data: dict[str, Any], dotted: str) -> float:
    value: Any = data
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def _encoder_weights(init: str) -> str:
    if not init:
        return "none (trained from scratch: no pretrained weights can be downloaded)"
    return f"none downloaded: initialised from {init}, itself trained here on ../shared/data"


def build_card(
    run_dir: Path,
    evaluation: dict[str, Any],
    command: str,
    *,
    status: str,
    limitations: list[str],
    extra: dict[str, Any],
    primary_metric: str,
) -> dict[str, Any]:
    config = json.loads((run_dir / "config.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    return {
        "architecture": config["spec"]["arch"],
        "encoder": config["spec"]["encoder"],
        "encoder_weights": _encoder_weights(config.get("init") or ""),
        "input_size": config["spec"]["input_size"],
        "preprocessing": PREPROCESSING,
        "input_region": "image",
        "threshold": evaluation.get("threshold", 0.5),
        "status": status,
        "limitations": limitations,
        "training": {
            "data": config["data"],
            "negatives": config.get("negatives", []),
            "negatives_per_source": config.get("negatives_per_source", 0),
            "structures": config["structures"],
            "split": {k: split[k] for k in ("rule", "seed", "val_fraction", "counts")},
            "epochs_run": len(history),
            "best_epoch": max(history, key=lambda h: h.get("val_select", h["val_dice"]))["epoch"],
            "hyperparameters": {
                k: config[k]
                for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "patience", "augment")
            },
            "loss": "BCE + soft Dice"
            + (" + 0.5 x BCE on the presence head" if "presence" in str(history[-1]) else "")
            + (" + weak zone loss on severity labels (training.weak)" if config.get("weak_data") else "")
            + (
                " + per-lung extent hinge on severity_ralo labels (training.ralo)"
                if any("ralo" in str(w) for w in config.get("weak_data") or [])
                else ""
            ),
            "weak_labels": {
                k: config[k]
                for k in ("weak_data", "weak_train_folds", "weak_val_folds", "weak_weight", "extent_weight")
                if k in config
            }
            if config.get("weak_data")
            else None,
            **({"negatives_where": config["negatives_where"]} if config.get("negatives_where") else {}),
            # Recorded by train when the run started; runs from before that are described now.
            "initialised_from": config.get("initialised_from") or describe_init(config.get("init") or ""),
            **({"positive_repeat": config["positive_repeat"]} if config.get("positive_repeat", 1) > 1 else {}),
            "optimizer": "AdamW, linear warm-up + cosine decay",
            "history": history,
            "wall_clock_s": round(sum(h["seconds"] for h in history)),
            "machine": MACHINE,
        },
        "validation": {
            "primary_metric": primary_metric,
            "primary_value": _dig(evaluation, primary_metric),
            "command": command,
            "metrics": evaluation,
        },
        "training_date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "code_version": git_rev(Path(__file__).resolve().parents[1]),
        **extra,
    }


def export(
    name: str,
    checkpoint: Path,
    evaluation_file: Path,
    command: str,
    *,
    status: str,
    limitations: list[str],
    extra: dict[str, Any] | None = None,
    primary_metric: str = "overall.dice",
    weights_dir: Path = models.WEIGHTS_DIR,
    force: bool = False,
    baseline: Path | None = None,
) -> Path:
    model, spec, _ = load_model(name, checkpoint=checkpoint)
    evaluation = json.loads(evaluation_file.read_text())
    card = build_card(
        checkpoint.parent,
        evaluation,
        command,
        status=status,
        limitations=limitations,
        extra=extra or {},
        primary_metric=primary_metric,
    )
    card = portable(card)
    card["version"] = f"{card['training_date']}-{card['code_version']}"
    shipped = models.card_path(name, weights_dir)
    new_value = card["validation"]["primary_value"]
    if baseline is not None:
        # The shipped weights scored by the same command on the same images: compare like with like.
        base = json.loads(baseline.read_text())
        shipped_sha = json.loads(shipped.read_text()).get("sha256") if shipped.exists() else None
        if not force and shipped_sha is not None and base.get("weights_sha256") != shipped_sha:
            raise NotBetterError(
                f"{name}: the baseline {baseline} scored weights {base.get('weights_sha256')}, not the shipped "
                f"{shipped_sha}: evaluate the shipped weights (no --checkpoint) with the same command"
            )
        card["validation"]["baseline"] = {
            "what": "the weights this export replaces, same evaluation",
            "command": base.get("command"),
            "primary_value": _dig(base, primary_metric),
        }
        if not force and _dig(base, primary_metric) >= new_value:
            raise NotBetterError(
                f"{name}: replaced weights' {primary_metric} {_dig(base, primary_metric):.4f} >= new "
                f"{new_value:.4f} on the same evaluation; not replacing (use --force)"
            )
    elif shipped.exists() and not force:
        old = json.loads(shipped.read_text()).get("validation", {})
        if old.get("primary_metric") != primary_metric:
            raise NotBetterError(
                f"{name}: the shipped card is scored by {old.get('primary_metric')}, not {primary_metric}: "
                "give --baseline (the shipped weights' evaluation on the same images) to compare"
            )
        if old.get("primary_value", -1) >= new_value:
            raise NotBetterError(
                f"{name}: shipped {primary_metric} {old['primary_value']:.4f} >= new "
                f"{new_value:.4f}; not replacing (use --force)"
            )
    path = models.save(model, spec, card, weights_dir)
    log.info("exported %s -> %s", checkpoint, path)
    return path
