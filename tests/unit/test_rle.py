"""SIIM-ACR run-length masks: column-major positions, starts relative to the previous run's end."""

from __future__ import annotations

import numpy as np
import pytest

from training.rle import decode, encode, read_csv, write_csv


def test_decode_hand_example() -> None:
    # 4x3 image, column-major: positions 1,2 (col 0 rows 1-2) and 5..6 (col 1 row 1 .. col 1 row 2).
    mask = decode("1 2 2 2", shape=(4, 3))
    expected = np.zeros((4, 3), bool)
    expected[1:3, 0] = True
    expected[1:3, 1] = True
    np.testing.assert_array_equal(mask, expected)


def test_encode_hand_example() -> None:
    mask = np.zeros((4, 3), bool)
    mask[3, 0] = mask[0, 1] = True  # positions 3 and 4 are one run across the column break
    mask[2, 2] = True  # position 10
    assert encode(mask) == "3 2 5 1"


def test_round_trip_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((37, 23)) > rng.uniform(0.2, 0.95)
        np.testing.assert_array_equal(decode(encode(mask), mask.shape), mask)


def test_empty_mask_is_minus_one() -> None:
    assert encode(np.zeros((8, 8), bool)) == "-1"
    assert not decode("-1", (8, 8)).any()
    assert not decode(" -1 ", (8, 8)).any()


def test_full_size_round_trip_through_csv(tmp_path) -> None:
    a = np.zeros((1024, 1024), bool)
    a[100:300, 700:900] = True
    b = np.zeros((1024, 1024), bool)
    b[500:520, 10:12] = True
    path = tmp_path / "train-rle.csv"
    write_csv(path, [("img-a", a), ("img-b", b), ("img-none", np.zeros_like(a))])
    back = read_csv(path)
    np.testing.assert_array_equal(back["img-a"], a)
    np.testing.assert_array_equal(back["img-b"], b)
    assert not back["img-none"].any()


def test_rows_of_one_image_are_ored(tmp_path) -> None:
    one = np.zeros((1024, 1024), bool)
    one[10:20, 10:20] = True
    two = np.zeros((1024, 1024), bool)
    two[600:610, 900:950] = True
    path = tmp_path / "train-rle.csv"
    path.write_text(f"ImageId, EncodedPixels\nx, {encode(one)}\nx, {encode(two)}\n")
    np.testing.assert_array_equal(read_csv(path)["x"], one | two)


@pytest.mark.parametrize("bad", ["5", "0 -3", "1048570 100"])
def test_invalid_rle_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError):
        decode(bad)


def test_import_siim_writes_a_shared_format_folder(tmp_path) -> None:
    from PIL import Image

    from training.data import load_mask, read_folder
    from training.siim import import_siim

    images = tmp_path / "siim_png"
    images.mkdir()
    rng = np.random.default_rng(0)
    positive = np.zeros((1024, 1024), bool)
    positive[100:400, 600:800] = True
    for image_id in ("1.2.3.pos", "1.2.3.neg"):
        Image.fromarray(rng.integers(0, 255, (1024, 1024), dtype=np.uint8)).save(images / f"{image_id}.png")
    rle = tmp_path / "train-rle.csv"
    write_csv(rle, [("1.2.3.pos", positive), ("1.2.3.neg", np.zeros_like(positive))])
    out = tmp_path / "siim"
    assert import_siim(rle, images, out) == 2
    samples = {s.id: s for s in read_folder(out, ("pneumothorax",))}
    assert set(samples) == {"1.2.3.pos", "1.2.3.neg"}
    pos = load_mask(samples["1.2.3.pos"].masks["pneumothorax"], (512, 512))
    assert pos[50:200, 300:400].all() and pos.sum() == 150 * 100
    assert not load_mask(samples["1.2.3.neg"].masks["pneumothorax"], (512, 512)).any()
