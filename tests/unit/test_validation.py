import json

import numpy as np
import pandas as pd
import pytest

from ml.config import load_params
from ml.data.contract import load_contract
from ml.data.drift import DriftThresholds
from ml.data.prepare import prepare
from ml.data.validate import class_shares, validate
from ml.errors import ValidationFailed
from tests.conftest import REPO, small_params, write_params

REPORT = "reports/validation.json"


@pytest.fixture
def prepared(project):
    params = load_params(write_params(project, small_params()))
    contract = load_contract(REPO / "gx/expectations/digits.json")
    prepare(params.data, contract)
    return contract


def run_gate(contract, **kwargs):
    kwargs.setdefault("min_class_fraction", 0.05)
    kwargs.setdefault("max_class_fraction", 0.2)
    return validate("data/processed", contract, REPORT, **kwargs)


def corrupt(project, split, change):
    path = project / f"data/processed/{split}.parquet"
    frame = pd.read_parquet(path)
    change(frame)
    frame.to_parquet(path, index=False)


def test_clean_digits_pass_with_drift_report_and_plot(prepared, project):
    report = run_gate(prepared, drift=DriftThresholds(), drift_report="reports/drift.json",
                      drift_plot="reports/drift.png")
    assert report["success"] and report["drift"]["level"] == "ok"
    assert set(report["splits"]) == {"train", "val", "test"}
    assert all(s["evaluated"] > 64 * 3 for s in report["splits"].values())
    assert report["contract"]["digest"] == prepared.digest
    assert json.loads((project / REPORT).read_text())["success"]
    drift = json.loads((project / "reports/drift.json").read_text())
    assert drift["reference"] == "contract" and len(drift["features"]) == 64
    assert (project / "reports/drift.png").read_bytes()[:4] == b"\x89PNG"


def test_each_broken_expectation_is_named_with_its_row_count(prepared, project):
    def change(frame):
        frame.loc[:4, "pixel_3"] = np.nan        # 5 nulls
        frame.loc[10:12, "pixel_10"] = 99.0      # 3 out of range
        frame.loc[20, "label"] = "42"            # 1 label outside the class list
    corrupt(project, "val", change)
    with pytest.raises(ValidationFailed) as err:
        run_gate(prepared)
    message = str(err.value)
    assert message.splitlines()[0].startswith("data validation failed: 4 expectation(s) broken")
    assert "val.pixel_3: expect_column_values_to_not_be_null {}: 5 of" in message
    assert "val.pixel_10: expect_column_values_to_be_between" in message and "3 of" in message
    assert "val.label: expect_column_values_to_be_in_set {}: 1 of 180 rows broke it, e.g. ['42']" in message
    assert "val.share (class shares): expect_column_values_to_be_between" in message  # '42': 1 of 180 rows
    report = json.loads((project / REPORT).read_text())
    assert not report["success"] and report["splits"]["train"]["success"]
    assert len(report["splits"]["val"]["failed"]) == 4


def test_a_class_absent_from_a_split_fails_or_warns(prepared, project):
    corrupt(project, "test", lambda f: f.drop(f[f.label == "0"].index, inplace=True))
    with pytest.raises(ValidationFailed) as err:
        run_gate(prepared, min_class_fraction=0.0)
    assert "test.label: expect_column_distinct_values_to_contain_set {}: classes absent: 0" in str(err.value)
    report = run_gate(prepared, min_class_fraction=0.0, allow_missing_classes=True)
    assert report["success"]
    (warning,) = report["splits"]["test"]["warnings"]
    assert warning["expectation"] == "expect_column_distinct_values_to_contain_set"


def test_class_balance(prepared, project):
    corrupt(project, "test", lambda f: f.drop(f[f.label == "0"].index[:-2], inplace=True))
    with pytest.raises(ValidationFailed) as err:
        run_gate(prepared)
    message = str(err.value)
    assert "test.share (class shares): expect_column_values_to_be_between" in message
    assert "1 of 10 classes broke it" in message


def test_drift_within_the_contract_fails_the_gate_and_warns_below_the_fail_threshold(prepared, project):
    for split in ("train", "val", "test"):
        corrupt(project, split, lambda f: f.update(f.filter(like="pixel_").clip(upper=8.0)))
    with pytest.raises(ValidationFailed) as err:
        run_gate(prepared, drift=DriftThresholds(), drift_report="reports/drift.json")
    first = str(err.value).splitlines()[0]
    assert first == f"data validation failed: drift (report: {REPORT})"
    assert "drift fail against the contract reference" in str(err.value)
    drift = json.loads((project / "reports/drift.json").read_text())
    assert drift["level"] == "fail" and drift["features"][0]["psi"] >= 0.25
    report = run_gate(prepared, drift=DriftThresholds(psi_warn=0.1, psi_fail=100.0, ks_pvalue=0.0))
    assert report["success"] and report["drift"]["level"] == "warn"


def test_drift_against_a_reference_table(prepared, project):
    reference = pd.read_parquet(project / "data/processed/train.parquet")
    report = run_gate(prepared, drift=DriftThresholds(), drift_report="reports/drift.json",
                      drift_reference=reference, drift_source="champion digits-classifier v1")
    assert report["drift"]["level"] in ("ok", "warn")
    assert json.loads((project / "reports/drift.json").read_text())["reference"] == "champion digits-classifier v1"


def test_stale_drift_outputs_are_removed_when_the_contract_fails(prepared, project):
    run_gate(prepared, drift=DriftThresholds(), drift_report="reports/drift.json", drift_plot="reports/drift.png")
    corrupt(project, "val", lambda f: f.drop(columns=["pixel_5"], inplace=True))
    with pytest.raises(ValidationFailed, match="val: expect_table_columns_to_match_ordered_list {}: missing pixel_5"):
        run_gate(prepared, drift=DriftThresholds(), drift_report="reports/drift.json", drift_plot="reports/drift.png")
    assert not (project / "reports/drift.json").exists() and not (project / "reports/drift.png").exists()


def test_class_shares_table():
    shares = class_shares(pd.DataFrame({"label": ["0", "0", "1", "2"]}))
    assert shares["share"].tolist() == [0.5, 0.25, 0.25]
