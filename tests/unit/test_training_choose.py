"""training choose: the winner is picked on one half of the images and scored on the other."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training.choose import choose, half
from training.cli import main


def write_variant(folder: Path, scores: dict[tuple[str, str], float]) -> Path:
    folder.mkdir(parents=True)
    with (folder / "per_image.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "id", "dice", "hd95_px"])
        for (source, image_id), v in scores.items():
            w.writerow([source, image_id, v, 10 * (1 - v)])
    return folder


IMAGES = [(source, f"img{i:03d}") for source in ("a", "b") for i in range(40)]


def test_halves_are_stable_and_both_used() -> None:
    sides = [half(*k) for k in IMAGES]
    assert sides == [half(*k) for k in IMAGES]
    assert 20 <= sides.count("choose") <= 60


def test_the_winner_on_the_choose_half_is_reported_on_the_other(tmp_path: Path) -> None:
    base = write_variant(tmp_path / "base", {k: 0.90 for k in IMAGES})
    # better by 0.02 on every image of source a only
    better = write_variant(tmp_path / "better", {k: 0.92 if k[0] == "a" else 0.90 for k in IMAGES})
    worse = write_variant(tmp_path / "worse", {k: 0.80 for k in IMAGES})
    out = choose([base, worse, better])
    assert out["chosen"] == str(better)
    n_report_a = sum(1 for k in IMAGES if k[0] == "a" and half(*k) == "report")
    gain = out["report_gain"]
    assert gain["by_source"] == {"a": pytest.approx(0.02), "b": pytest.approx(0.0)}
    assert gain["source_mean"] == pytest.approx(0.01)
    assert gain["images_better"] == n_report_a and gain["images_worse"] == 0
    assert out["halves"]["choose"] + out["halves"]["report"] == len(IMAGES)


def test_only_the_choose_half_decides(tmp_path: Path) -> None:
    base = write_variant(tmp_path / "base", {k: 0.90 for k in IMAGES})
    # wins big on the report half, loses on the choose half: must not be chosen
    sneaky = write_variant(tmp_path / "sneaky", {k: 0.99 if half(*k) == "report" else 0.89 for k in IMAGES})
    assert choose([base, sneaky])["chosen"] == str(base)


def test_ties_go_to_the_earlier_variant_and_lower_can_be_better(tmp_path: Path) -> None:
    base = write_variant(tmp_path / "base", {k: 0.90 for k in IMAGES})
    same = write_variant(tmp_path / "same", {k: 0.9003 for k in IMAGES})
    assert choose([base, same])["chosen"] == str(base)
    worse = write_variant(tmp_path / "worse", {k: 0.85 for k in IMAGES})
    assert choose([worse, base], metric="hd95_px", lower_is_better=True)["chosen"] == str(base)


def test_variants_on_other_images_are_refused(tmp_path: Path) -> None:
    base = write_variant(tmp_path / "base", {k: 0.9 for k in IMAGES})
    fewer = write_variant(tmp_path / "fewer", {k: 0.9 for k in IMAGES[:-1]})
    with pytest.raises(ValueError, match="scored other images"):
        choose([base, fewer])
    with pytest.raises(ValueError, match="no column"):
        choose([base, base], metric="auc")


def test_cli_writes_the_summary_with_its_command(tmp_path: Path) -> None:
    base = write_variant(tmp_path / "base", {k: 0.90 for k in IMAGES})
    better = write_variant(tmp_path / "better", {k: 0.93 for k in IMAGES})
    assert main(["choose", str(base), str(better), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["chosen"] == str(better) and summary["command"].startswith("python -m training choose")
