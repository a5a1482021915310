"""The training loop: AdamW, warm-up + cosine schedule, BCE+Dice, checkpoint each epoch, resume,
early stopping on validation Dice, per-epoch metrics in `metrics.csv` / `history.json`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.augment import radiograph_augment
from training.data import Cached, Sample, SegmentationDataset, cache_samples, read_folder
from training.losses import bce_dice_loss
from training.ralo import extent_loss, hard_extents, is_ralo_folder, ralo_samples
from training.severity_eval import THRESHOLDS as VAL_ZONE_THRESHOLDS
from training.splits import split, write_split
from training.weak import ZONE_THRESHOLD, attach_zones, hard_fractions, severity_samples, zone_loss
from workers.models import ModelSpec, build, card_path, load

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    spec: ModelSpec
    structures: tuple[str, ...]
    data: list[Path]
    run_dir: Path
    negatives: list[Path] = field(default_factory=list)
    negatives_per_source: int = 0
    # Keep only the negatives rows whose index column equals the value (e.g. {"class": "Normal"} for
    # covid_opacity_negatives: its Non-COVID pneumonias have undrawn opacities); folders without the
    # column are not filtered.
    negatives_where: dict[str, str] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    val_fraction: float = 0.15
    seed: int = 0
    # Seeds the data instead of `seed` where set: the train/validation split and the negatives draw.
    # Reruns that vary only `seed` (initialisation, augmentation, batch order) then train and are
    # scored on the same images, which measures how far one recipe's figures move from run to run.
    split_seed: int | None = None
    patience: int = 4
    aux_weight: float = 0.5
    # Time budget (minutes of training, summed over resumes). When set, the cosine schedule runs on
    # the fraction of the budget used or of the steps, whichever is further (schedule_progress), so the
    # learning rate has decayed when the run ends however busy the shared CPU is; the run stops when
    # the budget is spent.
    max_minutes: float = 0.0
    epoch_images: int = 0  # images drawn per epoch (0 = one pass over the training set): checkpoint cadence
    max_steps: int = 0  # 0 = full epochs; tests use a few steps
    limit: int = 0  # use only the first N samples (tests)
    augment: bool = True
    threads: int = 2
    # DataLoader worker processes (0 = augment in the training process). On a GPU the augmentation
    # is the bottleneck: give it the CPU cores.
    workers: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"; CUDA trains in mixed precision
    # Start from these weights instead of random ones: a training checkpoint (*.pt) or a shipped model
    # name ("lung"): fine-tuning, possibly at another input size (the networks are fully convolutional).
    init: str = ""
    # Each training image with a labelled structure is drawn this many times per pass: 27
    # pneumothorax positives among hundreds of negatives otherwise teach "absent" first.
    positive_repeat: int = 1
    # Weak labels (opacity): severity/ folders whose zone/score labels train through training.weak;
    # `weak_train_folds` enter training, `weak_val_folds` validation; other folds are never read.
    weak_data: list[Path] = field(default_factory=list)
    weak_train_folds: tuple[int, ...] = (0, 1, 2)
    weak_val_folds: tuple[int, ...] = (3,)
    weak_weight: float = 1.0
    # severity_ralo-format folders among `weak_data` train through the per-lung extent loss
    # (training.ralo), weighted by this, on the same folds.
    extent_weight: float = 1.0
    # What best.pt follows besides the weak-label error: the Dice averaged over validation images
    # ("images") or over the sources' own means ("sources", so a small source such as Darwin counts as
    # much as a large one: the lung goal is a figure per source).
    select_by: str = "images"

    @property
    def data_seed(self) -> int:
        """The seed of the split and the negatives draw."""
        return self.seed if self.split_seed is None else self.split_seed


def read_weak(folder: Path, folds: Sequence[int]) -> list[Sample]:
    """The weakly labelled samples of `folder` in `folds`: severity/ (0-6 score, Brixia zones) and
    severity_ralo/ (0-4 extent per lung) each through its own reader; the two scales are never mixed."""
    return (ralo_samples if is_ralo_folder(folder) else severity_samples)(folder, folds)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def collect_samples(cfg: TrainConfig) -> list[Sample]:
    samples = [s for folder in cfg.data for s in read_folder(folder, cfg.structures)]
    for folder in cfg.negatives:
        neg = read_folder(folder, cfg.structures, negative=True)
        for column, value in cfg.negatives_where.items():
            neg = [s for s in neg if column not in s.row or s.row[column] == value]
        if cfg.negatives_per_source:
            # A fixed, seed-dependent choice; sorted by a hash so it does not follow file order.
            rng = random.Random(f"negatives|{cfg.data_seed}|{folder.name}")
            neg = rng.sample(neg, min(cfg.negatives_per_source, len(neg)))
        samples += neg
    if cfg.limit:
        samples = samples[: cfg.limit]
    if not samples and not cfg.weak_data:
        raise ValueError(f"no samples with masks of {cfg.structures} in {cfg.data}")
    return samples


def schedule_progress(step: int, seconds: float, total_steps: int, budget_s: float) -> float:
    """How far the cosine schedule is, 0 -> 1: it follows whichever ends the run first, the steps of
    `--epochs` or the time budget. Following the budget alone left a fast machine's run at its peak
    rate when its epochs ran out first (a lent GPU's 46 epochs took 79 s of a 6 min budget)."""
    by_steps = step / max(1, total_steps)
    return max(by_steps, seconds / budget_s) if budget_s else by_steps


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 2% of `lr` as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(0.0, progress))
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def split_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def initial_weights(init: str) -> dict[str, torch.Tensor]:
    """State dict of a checkpoint file or of the shipped weights of model `init` (fp16 -> fp32)."""
    if init.endswith(".pt"):
        return cast(dict[str, torch.Tensor], torch.load(init, map_location="cpu", weights_only=False)["model"])
    shipped, _ = load(init)
    return {k: v.float() for k, v in shipped.state_dict().items()}


def init_input_size(init: str) -> int | None:
    """The input size the `init` weights were trained at (None if a checkpoint does not say).

    A fine-tune continues at that size unless `--input-size` says otherwise: the shipped lung model
    runs at 256 while the lung task's default is 160, and a GPU fine-tune from it that silently
    dropped to 160 left its Darwin result (0.918 -> 0.885) confounded with the size.
    """
    if init.endswith(".pt"):
        spec = torch.load(init, map_location="cpu", weights_only=False).get("spec") or {}
        return int(spec["input_size"]) if "input_size" in spec else None
    return int(json.loads(card_path(init).read_text())["input_size"])


def describe_init(init: str) -> str:
    """What `initial_weights(init)` loads, as a card states it: a shipped model with its version and
    sha256, which the name alone does not pin down once those weights are replaced."""
    if not init:
        return "random"
    if init.endswith(".pt"):
        return init
    card = json.loads(card_path(init).read_text())
    return f"{init} (shipped weights {card.get('version')}, sha256 {card.get('sha256')})"


def with_repeats(cached: list[Cached], positive_repeat: int) -> list[Cached]:
    """`cached` with each positive (`positive` = 1) listed `positive_repeat` times in all."""
    if positive_repeat < 1:
        raise ValueError(f"positive_repeat must be at least 1, not {positive_repeat}")
    return cached + [c for c in cached if c.positive] * (positive_repeat - 1)


def load_initial(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load `state` into `model`; return the names of the model's tensors it did not fill.

    Another task's weights may start a model (a lung model's encoder has seen thousands of chest
    X-rays, the pneumothorax set has 27 positives): tensors that `state` lacks, such as a
    classification head, keep their random start. The encoder must come whole, though: a state
    that misses or misshapes any encoder tensor is a different network and is refused.
    """
    own = model.state_dict()
    bad = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    if bad or unexpected or any(k.startswith("encoder.") for k in missing):
        raise ValueError(
            "initial weights do not fit this network: "
            f"shape differs for {bad[:3]}, unknown {unexpected[:3]}, missing {missing[:3]}"
        )
    model.load_state_dict(state, strict=False)
    if missing:
        log.info("not in the initial weights (random start): %s", ", ".join(missing))
    return missing


def _passes(loader: DataLoader[Any]) -> Iterator[Any]:
    """Batches of pass after pass over the data (the epoch loop decides when to stop)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:  # nothing to draw: end the epoch rather than spin
            return


def _seed_augment_worker(worker_id: int) -> None:
    """Each DataLoader worker draws its own augmentations: albumentations keeps its generator in the
    Compose, which every forked worker would otherwise inherit in the same state."""
    info = torch.utils.data.get_worker_info()
    augment = getattr(info.dataset, "augment", None) if info else None
    if info is not None and augment is not None:
        augment.set_random_seed(info.seed % 2**32)


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA device")
    return torch.device(choice)


def selection_dice(val_dice: float, by_source: dict[str, list[float]], select_by: str) -> float:
    """The Dice that best.pt follows: over images, or the mean of each source's mean ("sources")."""
    if select_by == "sources":
        return float(np.mean([np.mean(d) for d in by_source.values()])) if by_source else val_dice
    if select_by == "images":
        return val_dice
    raise ValueError(f"select_by must be 'images' or 'sources', not {select_by!r}")


def validate(
    model: torch.nn.Module,
    cached: Sequence[Cached],
    samples: Sequence[Sample],
    batch_size: int,
    device: torch.device | None = None,
    select_by: str = "images",
) -> dict[str, Any]:
    """Dice per image at the input grid (ignore pixels excluded), mean overall and per source; for
    weakly labelled images the severity count's MAE against their score (`val_severity_mae`).

    `val_select` is what early stopping and best.pt follow: the Dice (over images, or with
    `select_by="sources"` the mean of the per-source means) minus the weak-label error (the
    severity MAE at the validation images' best zone threshold, / 6).
    A quick per-epoch figure; `python -m training evaluate` gives the full-size metrics of the
    exported model.
    """
    model.eval()
    ds = SegmentationDataset(cached)
    dices: dict[int, float] = {}
    presence_correct: list[bool] = []
    severity_err: list[float] = []
    zone_correct: list[bool] = []
    scored_fractions: list[list[float]] = []
    scores: list[float] = []
    extent_err: list[float] = []
    losses = []
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(len(ds), start + batch_size)))
        items = [ds[i] for i in idx]
        b = {k: torch.from_numpy(np.stack([it[k] for it in items])).to(device or "cpu") for k in items[0]}
        y, v = b["target"], b["valid"]
        logits, cls = split_outputs(model(b["x"]))
        logits = logits.float()
        cls = cls.float() if cls is not None else None
        losses.append(bce_dice_loss(logits, y, v).item() * len(idx))
        pred = (logits > 0).float() * v
        yv = y * v
        inter = (pred * yv).sum((1, 2, 3))
        denom = pred.sum((1, 2, 3)) + yv.sum((1, 2, 3))
        dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)).tolist()
        pixel = (v.sum((1, 2, 3)) > 0).tolist()
        dices |= {i: d for i, d, p in zip(idx, dice, pixel, strict=True) if p}
        scored = ~torch.isnan(b["score"])
        zoned = (b["zone_target"] == 0) | (b["zone_target"] == 1)  # a half-affected target has no hard answer
        if scored.any() or zoned.any():
            fractions = hard_fractions(torch.sigmoid(logits), b["zones"])
            affected = fractions > ZONE_THRESHOLD
            severity_err += (affected.sum(1)[scored].float() - b["score"][scored]).abs().tolist()
            zone_correct += (affected.float() == b["zone_target"])[zoned].tolist()
            scored_fractions += fractions[scored].tolist()
            scores += b["score"][scored].tolist()
        extent_known = ~torch.isnan(b["extent_score"])
        if extent_known.any():
            extents = hard_extents(torch.sigmoid(logits), b["zones"]).to(b["extent_score"].device)
            extent_err += (extents[extent_known] - b["extent_score"][extent_known]).abs().tolist()
        if cls is not None:
            presence_correct += ((cls.reshape(-1) > 0).float() == b["positive"]).tolist()
    by_source: dict[str, list[float]] = {}
    for i, d in dices.items():
        by_source.setdefault(samples[i].source, []).append(d)
    val_dice = float(np.mean(list(dices.values()))) if dices else math.nan
    result: dict[str, Any] = {
        "val_loss": sum(losses) / max(1, len(ds)),
        "val_dice": val_dice,
        **{f"val_dice_{src}": float(np.mean(d)) for src, d in sorted(by_source.items())},
    }
    # Weak-label error on a 0-1 scale: severity MAE / 6 where scores exist, else zone error rate.
    weak_error = 0.0
    if zone_correct:
        result["val_zone_acc"] = float(np.mean(zone_correct))
        weak_error = 1 - result["val_zone_acc"]
    if severity_err:
        result["val_severity_mae"] = float(np.mean(severity_err))
        # The shipped zone threshold is tuned on validation folds afterwards: select epochs on the
        # MAE at the best threshold for these validation images, not at the fixed training one.
        fr, ref = np.array(scored_fractions), np.array(scores)
        maes = [float(np.abs((fr > t).sum(1) - ref).mean()) for t in VAL_ZONE_THRESHOLDS]
        best = int(np.argmin(maes))
        result["val_severity_mae_tuned"], result["val_zone_threshold"] = maes[best], float(VAL_ZONE_THRESHOLDS[best])
        weak_error = result["val_severity_mae_tuned"] / 6
    if extent_err:
        # RALO per-lung extent (0-4) error, on its own scale; it adds to the selection on a 0-1 scale.
        result["val_extent_mae"] = float(np.mean(extent_err))
        weak_error += result["val_extent_mae"] / 4
    if by_source:
        result["val_dice_source_mean"] = selection_dice(val_dice, by_source, "sources")
    selected_dice = selection_dice(val_dice, by_source, select_by)
    result["val_select"] = (0.0 if math.isnan(selected_dice) else selected_dice) - weak_error
    if presence_correct:
        result["val_presence_acc"] = float(np.mean(presence_correct))
        by_src_acc: dict[str, list[bool]] = {}
        for s, ok in zip(samples, presence_correct, strict=True):
            by_src_acc.setdefault(s.source, []).append(ok)
        result |= {f"val_presence_acc_{src}": float(np.mean(v)) for src, v in sorted(by_src_acc.items())}
    model.train()
    return result


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    (run_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:  # noqa: C901 — one loop, read top to bottom
    """Train (or resume) into `cfg.run_dir`; returns the final state summary."""
    torch.set_num_threads(cfg.threads)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    samples = collect_samples(cfg)
    train_s, val_s = split(samples, cfg.data_seed, cfg.val_fraction)
    if not val_s:  # tiny test sets: validate on the training images rather than on nothing
        val_s = list(train_s)  # a copy: the weak folds below must not land on both sides
    for folder in cfg.weak_data:  # split by the folder's own patient folds
        train_s += read_weak(folder, cfg.weak_train_folds)
        val_s += read_weak(folder, cfg.weak_val_folds)
    write_split(
        cfg.run_dir / "split.json",
        train_s,
        val_s,
        cfg.data_seed,
        cfg.val_fraction,
        weak_folds={"train": list(cfg.weak_train_folds), "validation": list(cfg.weak_val_folds)}
        if cfg.weak_data
        else None,
    )
    config_file = cfg.run_dir / "config.json"
    # The weights a shipped name stood for when the run started: a resume, or the export after a
    # release, would otherwise find other weights under the same name.
    started_from = (
        json.loads(config_file.read_text()).get("initialised_from") if resume and config_file.exists() else None
    ) or describe_init(cfg.init)
    config_file.write_text(json.dumps(asdict(cfg) | {"initialised_from": started_from}, default=str, indent=1) + "\n")
    log.info(
        "%d train / %d validation images (%d / %d patients)",
        len(train_s),
        len(val_s),
        len({s.patient for s in train_s}),
        len({s.patient for s in val_s}),
    )

    t0 = time.monotonic()
    train_c = cache_samples(train_s, cfg.structures, cfg.spec.input_size)
    val_c = cache_samples(val_s, cfg.structures, cfg.spec.input_size)
    attach_zones(train_c, train_s, cfg.spec.input_size, cfg.run_dir / "zones.npz")
    attach_zones(val_c, val_s, cfg.spec.input_size, cfg.run_dir / "zones.npz")
    log.info("cached images in %.0f s", time.monotonic() - t0)

    device = pick_device(cfg.device)
    amp = device.type == "cuda"
    model = build(cfg.spec)
    if cfg.init:
        untrained = load_initial(model, initial_weights(cfg.init))
        log.info("initialised from %s%s", cfg.init, f" ({len(untrained)} tensors left untrained)" if untrained else "")
    model = model.to(device)
    model.train()
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ds = SegmentationDataset(with_repeats(train_c, cfg.positive_repeat), radiograph_augment() if cfg.augment else None)
    # An epoch may be shorter or (on a GPU, to checkpoint less often) longer than one pass.
    epoch_len = cfg.epoch_images or len(ds)
    steps_per_epoch = max(1, epoch_len // cfg.batch_size) if epoch_len > cfg.batch_size else 1
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    total_steps = steps_per_epoch * cfg.epochs
    budget_s = cfg.max_minutes * 60

    def progress(step: int, seconds: float) -> float:
        return schedule_progress(step, seconds, total_steps, budget_s)

    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "best": -math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],
        "train_seconds": 0.0,
    }
    last = cfg.run_dir / "last.pt"
    if resume and last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        log.info(
            "resumed from %s at epoch %d (best %.4f at epoch %d)",
            last,
            state["epoch"],
            state["best"],
            state["best_epoch"],
        )

    # One loader for the whole run: its workers persist across epochs, and each epoch reseeds its
    # shuffle so that a resumed run draws the same batches.
    shuffle = torch.Generator()
    loader: DataLoader[Any] = DataLoader(
        cast(Any, ds),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(ds) > cfg.batch_size,
        generator=shuffle,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        worker_init_fn=_seed_augment_worker if cfg.workers else None,
        pin_memory=device.type == "cuda",
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size for the whole run
    while state["epoch"] < cfg.epochs:
        if state["bad_epochs"] >= cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        history = state["history"]
        if budget_s and state["train_seconds"] >= budget_s:
            log.info("time budget of %.0f min spent", cfg.max_minutes)
            break
        epoch = state["epoch"] + 1
        seed_everything(cfg.seed * 1000 + epoch)  # same batches whether or not the run was resumed
        shuffle.manual_seed(cfg.seed * 1000 + epoch)
        t_epoch = time.monotonic()
        losses = []
        # A progress bar on a terminal; background runs log to a file instead.
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not sys.stderr.isatty(), leave=False)
        for i, batch in enumerate(_passes(loader)):
            used = state["train_seconds"] + time.monotonic() - t_epoch
            if i >= steps_per_epoch or (budget_s and used >= budget_s):
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(state["step"], progress(state["step"], used), cfg)
            b = {k: t.to(device, non_blocking=True) for k, t in batch.items()}
            with torch.autocast(device.type, enabled=amp):
                logits, cls = split_outputs(model(b["x"]))
            loss = bce_dice_loss(logits.float(), b["target"], b["valid"])
            if cfg.weak_data:
                loss = loss + cfg.weak_weight * zone_loss(logits.float(), b["zones"], b["zone_target"], b["score"])
                loss = loss + cfg.extent_weight * extent_loss(logits.float(), b["zones"], b["extent_bounds"])
            if cls is not None:
                loss = loss + cfg.aux_weight * F.binary_cross_entropy_with_logits(
                    cls.float().reshape(-1), b["positive"]
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            state["step"] += 1
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if (i + 1) % 20 == 0 and bar.disable:  # a log file gets a line every 20 steps instead
                el = time.monotonic() - t_epoch
                log.info(
                    "epoch %d step %d/%d loss %.4f (%.2f s/step, ~%.0f s left in epoch)",
                    epoch,
                    i + 1,
                    steps_per_epoch,
                    np.mean(losses[-20:]),
                    el / (i + 1),
                    el / (i + 1) * (steps_per_epoch - i - 1),
                )
        bar.close()
        train_time = time.monotonic() - t_epoch
        metrics = validate(model, val_c, val_s, cfg.batch_size, device, cfg.select_by)
        seconds = time.monotonic() - t_epoch
        state["train_seconds"] += seconds
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "lr": opt.param_groups[0]["lr"],
            "train_s": round(train_time, 1),
            "seconds": round(seconds, 1),
            **{k: round(v, 5) for k, v in metrics.items()},
        }
        history.append(row)
        log.info("epoch %d: %s", epoch, json.dumps(row))
        state["epoch"] = epoch
        if metrics["val_select"] > state["best"]:
            state["best"], state["best_epoch"], state["bad_epochs"] = metrics["val_select"], epoch, 0
            torch.save(
                {"model": model.state_dict(), "spec": asdict(cfg.spec), "epoch": epoch, "metrics": row},
                cfg.run_dir / "best.pt",
            )
        else:
            state["bad_epochs"] += 1
        # Write to a temporary file first: an interrupted save must not destroy the last checkpoint.
        tmp = cfg.run_dir / "last.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "state": state,
                "spec": asdict(cfg.spec),
            },
            tmp,
        )
        tmp.replace(last)
        _write_metrics(cfg.run_dir, history)
    summary = {
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_val_select": state["best"],
        "train_seconds": state["train_seconds"],
    }
    log.info("done: %s", summary)
    return summary
