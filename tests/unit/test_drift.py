"""Drift: PSI and KS per feature and the label shares against a contract's reference or a table."""

import json

import numpy as np
import pandas as pd
import pytest

from ml.data.drift import (FAIL, OK, WARN, DriftThresholds, bin_shares, level, measure_drift, plot_drift, psi,
                           reference_statistics)
from tests.datasets import animals

FEATURES = ["length", "weight", "age"]


def reference_of(frame):
    return reference_statistics(frame[FEATURES], frame["species"], ("cat", "dog", "emu"))


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift():
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    small, large = psi([0.25] * 4, [0.3, 0.25, 0.25, 0.2]), psi([0.25] * 4, [0.7, 0.1, 0.1, 0.1])
    assert 0 < small < 0.1 < 0.25 < large
    assert np.isfinite(psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]))  # empty bins are floored, not infinite


def test_values_beyond_the_reference_range_count_in_the_outer_bins():
    assert bin_shares(np.array([-5.0, 0.5, 1.5, 99.0]), [0.0, 1.0, 2.0]).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("psi_value, pvalue, expected", [
    (0.0, 0.5, OK), (0.1, 0.5, WARN), (0.05, 0.001, WARN), (0.25, 0.5, FAIL), (0.3, None, FAIL), (0.09, None, OK),
])
def test_level(psi_value, pvalue, expected):
    assert level(psi_value, pvalue, DriftThresholds(psi_warn=0.1, psi_fail=0.25, ks_pvalue=0.01)) == expected


def test_a_resample_does_not_drift_and_a_shift_fails():
    reference = reference_of(animals(400, seed=0))  # PSI over 10 bins is noisy below a few hundred rows
    same = animals(400, seed=1)
    report = measure_drift(same[FEATURES], same["species"], reference, DriftThresholds())
    assert report["level"] == OK and "failed" not in report and "warned" not in report
    assert {r["feature"] for r in report["features"]} == set(FEATURES)

    shifted = animals(400, seed=1).assign(weight=lambda f: f.weight + 8)
    report = measure_drift(shifted[FEATURES], shifted["species"], reference, DriftThresholds())
    assert report["level"] == FAIL and report["failed"] == ["weight"]
    worst = report["features"][0]
    assert worst["feature"] == "weight" and worst["psi"] >= 0.25 and worst["ks_pvalue"] < 0.01


def test_label_shares_drift():
    reference = reference_of(animals())
    skewed = pd.concat([animals(seed=2), animals(seed=3)[lambda f: f.species == "cat"]], ignore_index=True)
    report = measure_drift(skewed[FEATURES], skewed["species"], reference, DriftThresholds(psi_fail=0.5))
    assert report["label"]["level"] == WARN and "label" in report["warned"]
    assert report["label"]["current_shares"] == [0.5, 0.25, 0.25]


def test_against_a_reference_table_the_ks_test_uses_its_columns():
    base, other = animals(seed=0), animals(seed=4)
    reference = reference_of(base)
    with_table = measure_drift(other[FEATURES], other["species"], reference, DriftThresholds(),
                               reference_table=base[FEATURES], source="champion")
    with_quantiles = measure_drift(other[FEATURES], other["species"], reference, DriftThresholds())
    assert with_table["reference"] == "champion"
    pvalues = lambda r: {x["feature"]: x["ks_pvalue"] for x in r["features"]}  # noqa: E731
    assert pvalues(with_table) != pvalues(with_quantiles)


def test_report_is_json_and_the_plot_a_png(tmp_path):
    frame = animals(seed=1).assign(length=lambda f: f.length * 1.5)
    report = measure_drift(frame[FEATURES], frame["species"], reference_of(animals()), DriftThresholds())
    json.loads(json.dumps(report))
    path = plot_drift(report, tmp_path / "drift.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
