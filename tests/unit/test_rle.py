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
