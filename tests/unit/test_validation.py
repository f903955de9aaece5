import json

import numpy as np
import pandas as pd
import pytest

from ml.config import load_params
from ml.data.prepare import prepare
from ml.errors import ValidationFailed
from ml.data.validate import class_shares, validate
from tests.conftest import small_params, write_params


@pytest.fixture
def prepared(project):
    params = load_params(write_params(project, small_params()))
    prepare(params.data)
    return params


def test_clean_digits_pass_and_report_is_written(prepared, project):
    report = validate(prepared.validate, prepared.data.processed_dir)
    assert report["success"]
    assert set(report["splits"]) == {"train", "val", "test"}
    assert all(s["evaluated"] > 64 * 3 for s in report["splits"].values())
    assert json.loads((project / "reports/validation.json").read_text())["success"]


def corrupt(project, split, change):
    path = project / f"data/processed/{split}.parquet"
    frame = pd.read_parquet(path)
    change(frame)
    frame.to_parquet(path, index=False)


def test_each_broken_expectation_is_named_with_its_row_count(prepared, project):
    def change(frame):
        frame.loc[:4, "pixel_3"] = np.nan        # 5 nulls
        frame.loc[10:12, "pixel_10"] = 99.0      # 3 out of range
        frame.loc[20, "label"] = 42              # 1 unknown label
    corrupt(project, "val", change)
    with pytest.raises(ValidationFailed) as err:
        validate(prepared.validate, prepared.data.processed_dir)
    message = str(err.value)
    assert message.splitlines()[0].startswith("data validation failed: 4 expectation(s) broken")
    assert "val.pixel_3: expect_column_values_to_not_be_null {}: 5 of" in message
    assert "val.pixel_10: expect_column_values_to_be_between" in message and "3 of" in message
    assert "val.label: expect_column_values_to_be_in_set" in message and "1 of" in message
    report = json.loads((project / "reports/validation.json").read_text())
    assert not report["success"] and report["splits"]["train"]["success"]
    assert len(report["splits"]["val"]["failed"]) == 4


def test_class_balance_and_row_count(prepared, project):
    corrupt(project, "test", lambda f: f.drop(f[f.label == 0].index[:-2], inplace=True))
    params = load_params(write_params(project, small_params(validate={"min_rows": 400})))
    with pytest.raises(ValidationFailed) as err:
        validate(params.validate, params.data.processed_dir)
    message = str(err.value)
    assert "test.share (class shares): expect_column_values_to_be_between" in message
    assert "1 of 10 classes broke it" in message
    assert "test: expect_table_row_count_to_be_between" in message


def test_wrong_feature_count(prepared, project):
    params = load_params(write_params(project, small_params(validate={"num_features": 10})))
    with pytest.raises(ValidationFailed, match="expect_table_column_count_to_equal"):
        validate(params.validate, params.data.processed_dir)


def test_class_shares_table():
    shares = class_shares(pd.DataFrame({"label": [0, 0, 1, 2]}))
    assert shares["share"].tolist() == [0.5, 0.25, 0.25]
