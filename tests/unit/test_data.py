from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import load_params
from ml.data.contract import infer_spec, load_contract, write_contract
from ml.data.prepare import LABEL, Schema, load_split, prepare, split, to_training_frame
from ml.errors import DataError, ValidationFailed
from tests.conftest import REPO, small_params, write_params

DIGITS = REPO / "gx/expectations/digits.json"


def data_cfg(project: Path, **overrides):
    return load_params(write_params(project, small_params(data=overrides))).data


def contract_for(project: Path, frame: pd.DataFrame, label: str):
    write_contract(project / "contract.json", infer_spec(frame, label, "t", min_rows=5))
    return load_contract(project / "contract.json")


def test_digits_split_is_stratified_seeded_and_complete(project):
    cfg = data_cfg(project)
    schema = prepare(cfg, load_contract(DIGITS))
    assert schema.num_classes == 10 and len(schema.features) == 64
    assert (project / "data/raw/digits.csv").is_file()
    frames = {n: pd.read_parquet(project / f"data/processed/{n}.parquet") for n in ("train", "val", "test")}
    assert sum(len(f) for f in frames.values()) == 1797
    assert len(frames["test"]) == 360  # sklearn rounds the test share up
    shares = [f[LABEL].value_counts(normalize=True).sort_index() for f in frames.values()]
    assert all(np.allclose(s, shares[0], atol=0.02) for s in shares)
    first = {n: f.copy() for n, f in frames.items()}
    prepare(cfg, load_contract(DIGITS))
    for name, frame in first.items():
        pd.testing.assert_frame_equal(frame, pd.read_parquet(project / f"data/processed/{name}.parquet"))
    assert Schema.read(cfg.processed_dir) == schema


def test_csv_source_with_string_labels(project):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(120, 3)), columns=["a", "b", "c"])
    frame["species"] = np.repeat(["cat", "dog", "emu"], 40)
    frame.to_csv(project / "animals.csv", index=False)
    schema = prepare(data_cfg(project, source="animals.csv", label_column="species"),
                     contract_for(project, frame, "species"))
    assert schema.classes == ("cat", "dog", "emu") and schema.features == ("a", "b", "c")
    x, y = load_split("data/processed", "train")
    assert x.dtype == np.float32 and set(y) == {0, 1, 2}
    assert (project / "data/raw/animals.csv").read_bytes() == (project / "animals.csv").read_bytes()


def test_missing_raw_file(project):
    with pytest.raises(DataError, match=r"^data.source: raw file nope.csv not found$"):
        prepare(data_cfg(project, source="nope.csv"), load_contract(DIGITS))
    assert not (project / "data").exists()


def test_csv_without_label_column_writes_nothing(project):
    pd.DataFrame({"a": [1, 2, 3], "b": [4, 5, 6]}).to_csv(project / "x.csv", index=False)
    with pytest.raises(DataError, match=r"label column 'label' not found; columns are a, b"):
        prepare(data_cfg(project, source="x.csv"), load_contract(DIGITS))
    assert not (project / "data").exists()


def test_non_numeric_feature_column_breaks_a_numeric_contract(project):
    good = pd.DataFrame({"a": [1.0, 2.0, 3.0] * 4, "colour": [0.1, 0.2, 0.3] * 4, "label": [0, 1, 2] * 4})
    contract = contract_for(project, good, "label")
    good.assign(colour=["r", "g", "b"] * 4).to_csv(project / "x.csv", index=False)
    with pytest.raises(ValidationFailed, match=r"dataset.colour: expect_column_values_to_be_of_type .*observed str"):
        prepare(data_cfg(project, source="x.csv"), contract)
    assert not (project / "data").exists()


def test_bad_source_keeps_previous_outputs(project):
    prepare(data_cfg(project), load_contract(DIGITS))
    before = (project / "data/processed/train.parquet").read_bytes()
    with pytest.raises(DataError):
        prepare(data_cfg(project, source="missing.parquet"), load_contract(DIGITS))
    assert (project / "data/processed/train.parquet").read_bytes() == before
    assert (project / "data/raw/digits.csv").is_file()


@pytest.mark.parametrize("source, message", [
    ("sklearn:iris", "unknown scikit-learn dataset 'iris'"),
    ("data.txt", "expected .csv or .parquet"),
])
def test_unsupported_sources(project, source, message):
    (project / "data.txt").write_text("x")
    with pytest.raises(DataError, match=message):
        prepare(data_cfg(project, source=source), load_contract(DIGITS))


def test_a_label_with_fewer_than_three_rows_is_split_unstratified():
    frame = pd.DataFrame({"a": np.arange(20.0), LABEL: ["0"] * 18 + ["1"] * 2})
    parts = split(frame, 0.2, 0.1, 0)
    assert sum(len(p) for p in parts.values()) == 20
    assert pd.concat(parts.values())[LABEL].value_counts().to_dict() == {"0": 18, "1": 2}


def test_training_frame_rejects_empty_labels():
    frame = pd.DataFrame({"a": [1.0, 2.0], "y": [1, None]})
    with pytest.raises(DataError, match="label column 'y' has 1 empty values"):
        to_training_frame(frame, "y", "t.csv")


def test_a_missing_or_broken_stage_output_is_a_one_line_data_error(tmp_path):
    from ml.errors import DataError
    from ml.io import read_json

    with pytest.raises(DataError, match=r"schema.json: not found \(run the stage that writes it first\)"):
        read_json(tmp_path / "schema.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
