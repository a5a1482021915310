"""The severity rule comparison: rules, fitters and the cross-fitting protocol, on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")  # training.severity_rules imports the training package's model code

from training import severity_rules as sr


def test_count_rule_broadcasts_one_three_or_six_thresholds() -> None:
    # RU RM RL LU LM LL
    f = np.array([[0.5, 0.2, 0.8, 0.1, 0.3, 0.6]])
    assert sr.count_rule(f, np.array([0.25])).tolist() == [4]  # 0.5, 0.8, 0.3, 0.6
    # rows: upper > 0.4, middle > 0.1, lower > 0.7 -> RU, RM, RL, LM
    assert sr.count_rule(f, np.array([0.4, 0.1, 0.7])).tolist() == [4]
    assert sr.count_rule(f, np.array([0.9, 0.9, 0.9, 0.0, 0.9, 0.9])).tolist() == [1]


def test_soft_count_counts_part_of_a_zone_under_the_threshold() -> None:
    f = np.array([[0.3, 0.3, 0.3, 0.0, 0.0, 0.9]])
    # t = 0.4: 0.75 * 3 + 0 + 0 + 1 = 3.25 -> 3; the hard count says 1
    assert sr.soft_count_rule(f, np.array([0.4])).tolist() == [3]
    assert sr.count_rule(f, np.array([0.4])).tolist() == [1]


def test_fit_rows_finds_the_row_thresholds_that_explain_the_scores() -> None:
    # Upper zones count from 0.3, lower ones only from 0.7: one shared threshold cannot fit both.
    f = np.array(
        [
            [0.35, 0.0, 0.5, 0.35, 0.0, 0.5],  # 2 (uppers), lowers under 0.7
            [0.0, 0.0, 0.8, 0.0, 0.0, 0.8],  # 2 (lowers)
            [0.2, 0.0, 0.6, 0.2, 0.0, 0.0],  # 0
            [0.35, 0.0, 0.8, 0.0, 0.0, 0.0],  # 2
        ]
    )
    ref = np.array([2.0, 2.0, 0.0, 2.0])
    rows = sr.fit_rows(f, ref)
    assert 0.2 <= rows[0] < 0.35 and 0.6 <= rows[2] < 0.8
    assert sr.count_rule(f, rows).tolist() == [2, 2, 0, 2]
    single = sr.fit_single(f, ref)
    assert np.abs(sr.count_rule(f, single) - ref).mean() > 0  # why the candidate exists


def test_cross_fit_scores_each_fold_with_the_other_folds_parameters() -> None:
    feats = {3: np.array([[0.5] * 6, [0.0] * 6]), 4: np.array([[0.5] * 6, [0.1] * 6])}
    refs = {3: np.array([6.0, 0.0]), 4: np.array([6.0, 6.0])}
    result = sr.cross_fit(sr.RULES[0], feats, refs)
    # fold 4 fits its scores of 6 with the smallest threshold 0.01: fold 3's zeros stay 0 -> MAE 0
    assert result["per_fold"]["3"] == {"params": [0.01], "n": 2, "mae": 0.0}
    # fold 3 fits 0.01 as well (any t < 0.5 fits it; ties go to the smallest): fold 4's 0.1 image
    # scores 6 -> MAE 0; a larger tie-break would have scored it 0
    assert result["per_fold"]["4"] == {"params": [0.01], "n": 2, "mae": 0.0}
    assert result["cv"]["n"] == 4
