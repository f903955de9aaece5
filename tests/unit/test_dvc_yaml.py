"""dvc.yaml must declare exactly the params keys each stage's code reads, and its own code."""

import pytest
import yaml

from ml.config import (AnomalyConfig, ContractConfig, DataConfig, DriftConfig, EvaluateConfig, RegisterConfig, TrainConfig,
                       ValidateConfig, section_keys)
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
EXPECTED = {
    "prepare": [*section_keys(DataConfig, "data"), *section_keys(ContractConfig, "contract")],
    "validate": ["data.processed_dir", *section_keys(ContractConfig, "contract"),
                 *section_keys(ValidateConfig, "validate"), *section_keys(DriftConfig, "drift"), "register.model_name"],
    "train": ["data.processed_dir", "validate.report", *section_keys(TrainConfig, "train"),
              *section_keys(AnomalyConfig, "anomaly")],
    "evaluate": ["data.processed_dir", "train.model_dir", "train.run_file",
                 *section_keys(EvaluateConfig, "evaluate")],
    "register": ["data.processed_dir", "train.run_file", "evaluate.metrics_file",
                 *section_keys(RegisterConfig, "register")],
}


def test_pipeline_order():
    assert list(STAGES) == ["prepare", "validate", "train", "evaluate", "register"]


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_stage_params_match_what_the_code_reads(stage):
    assert sorted(STAGES[stage]["params"]) == sorted(EXPECTED[stage])


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_stage_runs_and_depends_on_its_own_module(stage):
    assert STAGES[stage]["cmd"] == f"python -m tasks.{stage}"
    assert f"tasks/{stage}.py" in STAGES[stage]["deps"]
    for dep in STAGES[stage]["deps"]:
        assert (REPO / dep).exists() or not dep.endswith(".py"), dep
