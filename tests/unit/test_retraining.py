"""The retraining's decision and report as pure functions over plain data; the source checks that
need no server; the deployment's trigger as Prefect parses it."""

from pathlib import Path

import pytest
import yaml

from ml.data.source import fetch_source
from ml.errors import DataError
from tasks.retrain import (RETRAIN, SKIP, Baseline, Comparison, SplitScores, compared_params, decide,
                           replacement_line, summary_markdown)

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"data.processed_dir": "data/processed", "train.lr": "0.003", "register.model_name": "m"}
MD5, COMMIT = "aaa.dir", "c0ffee" * 6


def baseline(version="1", role="champion", md5=MD5, commit=COMMIT, params=PARAMS):
    return Baseline(version, role, md5, commit, params)


@pytest.mark.parametrize(("baselines", "action", "new_data", "says"), [
    ([], RETRAIN, True, "no registered version yet"),
    ([baseline()], SKIP, False, "nothing new"),
    ([baseline(md5="bbb.dir")], RETRAIN, True, "dataset aaa.dir (v1: bbb.dir)"),
    ([baseline(commit="deadbeef" * 5)], RETRAIN, False, "code commit c0ffeec0ffee (v1: deadbeefdead)"),
    ([baseline(params={**PARAMS, "train.lr": "0.01"})], RETRAIN, False, "train.lr=0.003 (v1: 0.01)"),
    ([baseline(params=None)], RETRAIN, False, "v1's are not recorded"),
    ([baseline(params={**PARAMS, "train.extra": "1"})], RETRAIN, False, "train.extra=(unset)"),
    # the champion differs, but the newest (pending) version was made from the same inputs
    ([baseline(md5="bbb.dir"), baseline("2", "newest, PendingManualApproval")], SKIP, False, "m v2 (newest"),
    ([baseline(md5="bbb.dir"), baseline("2", "newest", commit="x" * 40)], RETRAIN, False, "v1 (champion)"),
])
def test_decide(baselines, action, new_data, says):
    decision = decide("m", MD5, COMMIT, PARAMS, baselines)
    assert (decision.action, decision.new_data) == (action, new_data)
    assert says in decision.reason, decision.reason


def test_compared_params_leave_out_the_source_and_settings():
    flat = {"data.source": "s3://b/k.csv", "data.seed": 42, "train.hidden_sizes": [32], "settings.tracking.uri": "x",
            "tune.n_trials": 3}
    assert compared_params(flat) == {"data.seed": "42", "train.hidden_sizes": "[32]"}


def comparison() -> Comparison:
    return Comparison("3", [SplitScores("new_test", "new.dir", 340, 0.90, 0.95),
                            SplitScores("champion_test", "old.dir", why="not in the local DVC cache")])


def test_version_tags_say_what_a_pending_version_replaces_on_both_splits():
    tags = comparison().version_tags()
    assert tags["retrain_replaces"] == "3" and tags["retrain_new_test_delta"] == "+0.050000"
    line = replacement_line(tags)
    assert line.startswith("would replace champion v3: new_test 0.9000 -> 0.9500 (+0.0500); champion_test not measured")
    assert replacement_line({}) == "" and replacement_line({"retrain_replaces": "none"}) == "replaces no champion"
    assert comparison().metrics() == {"retrain/new_test/champion_accuracy": 0.90,
                                      "retrain/new_test/challenger_accuracy": 0.95,
                                      "retrain/new_test/delta_accuracy": pytest.approx(0.05)}


def test_summary_names_decision_diff_comparison_and_next_command():
    text = summary_markdown({
        "decision": "retrained", "reason": "changed since m v3 (champion): dataset new.dir", "source": "s3://b/k.csv",
        "dataset_md5": "new.dir", "git_commit": COMMIT, "comparison": comparison().to_dict(),
        "dataset_diff": {"new": {"rows": 10, "class_shares": {"0": 0.5, "1": 0.5}},
                         "champion": {"rows": 12, "class_shares": {"0": 0.25, "1": 0.75}},
                         "drift": {"level": "warn", "reference": "contract", "label_psi": 0.12,
                                   "worst": [{"feature": "pixel_3", "psi": 0.2, "ks_pvalue": 0.001, "level": "warn"}]}},
        "registered": {"model_name": "m", "version": "4", "status": "PendingManualApproval"}})
    assert text.startswith("# Retraining: retrained")
    for expected in ("| new | 10 | 0: 0.500, 1: 0.500 |", "| champion | 12 |", "| pixel_3 | 0.200 |",
                     "| new_test | `new.dir` | 340 | 0.9000 | 0.9500 | +0.0500 |", "champion_test (not in the local",
                     "mlops models approve m 4 --reason", "mlops models reject m 4 --reason"):
        assert expected in text, expected
    failed = summary_markdown({"decision": "failed", "reason": "source x: no such file", "error": "source x: no such file"})
    assert "## Why it stopped" in failed and "approve" not in failed


@pytest.mark.parametrize(("uri", "message"), [
    ("missing/file.csv", "source missing/file.csv: no such file"),
    ("data.txt", "source data.txt: suffix '.txt'; expected .csv or .parquet"),
    ("https://example.com/d.csv", "unsupported scheme"),
    ("s3://bucket-only", "expected s3://bucket/key.csv"),
    ("s3://b/key.json", "expected s3://bucket/key.csv"),
])
def test_a_source_that_cannot_be_read_is_one_line(tmp_path, uri, message):
    with pytest.raises(DataError) as caught:
        fetch_source(uri, tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_local_and_builtin_sources_are_read_where_they_are(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("a,label\n1,0\n")
    assert fetch_source(str(csv), tmp_path / "dl").local == str(csv)
    assert fetch_source("sklearn:digits", tmp_path / "dl").local == "sklearn:digits"
    assert not (tmp_path / "dl").exists()


def test_the_nightly_deployment_runs_the_retraining_flow_and_its_trigger_parses():
    from prefect.events import DeploymentEventTrigger, DeploymentTriggerTypes
    from pydantic import TypeAdapter

    from flows.retraining import DATA_NEW_EVENT, retraining_pipeline

    config = yaml.safe_load((REPO / "deploy/prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == "nightly-retrain"]
    path, name = nightly["entrypoint"].split(":")
    assert (path, name) == ("flows/retraining.py", "retraining_pipeline")
    assert retraining_pipeline.name == "training-pipeline"  # the deployment is training-pipeline/nightly-retrain
    (trigger,) = [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in nightly["triggers"]]
    assert isinstance(trigger, DeploymentEventTrigger) and trigger.enabled is False
    assert trigger.expect == {DATA_NEW_EVENT} and trigger.parameters == {"params_path": "params.yaml"}


def test_a_directory_comes_back_out_of_the_dvc_cache_by_its_md5(tmp_path, monkeypatch):
    from dvc.repo import Repo

    from ml.provenance import dir_md5
    from tasks.retrain import materialize_dvc_dir

    monkeypatch.chdir(tmp_path)
    Repo.init(no_scm=True).close()
    data = tmp_path / "processed"
    data.mkdir()
    for name, text in (("test.parquet", "t"), ("train.parquet", "tr"), ("schema.json", "{}")):
        (data / name).write_text(text)
    md5 = dir_md5(data)
    with Repo(".") as repo:
        repo.add("processed")
    out = tmp_path / "out"
    assert materialize_dvc_dir(md5, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == {p.name: p.read_text() for p in data.iterdir()}
    assert not materialize_dvc_dir("0" * 32 + ".dir", tmp_path / "none")
    assert not materialize_dvc_dir("0" * 32, tmp_path / "none")
