"""Lineage queries on a real embedded SQLite MLflow store, with runs tagged as the pipeline tags them
and deployment records appended through deploy.records."""

import json
import os

import pandas as pd
import pytest
from mlflow import MlflowClient

from deploy.records import DeploymentRecord, append_record
from ml.errors import RegistryError
from mlops.cli import main
import lineage.graph as lineage
from registry import store
from lineage.render import to_mermaid, to_text

MD5 = "0123456789abcdef0123456789abcdef.dir"
OTHER_MD5 = "fedcba9876543210fedcba9876543210.dir"
FLOW_RUN_ID = "6b0d5e2a-0d7e-4a57-9a43-1f0e3c1b2a77"


def log_dataset(client, run_id, md5, source="sklearn:digits"):
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.DataFrame({"pixel_0": [0.0, 1.0], "label": [0, 1]})
    dataset = mlflow.data.from_pandas(frame, source="/data/processed", name="processed", digest=md5, targets="label")
    tags = [InputTag("mlflow.data.context", "training"), InputTag("dvc_md5", md5), InputTag("raw_source", source),
            InputTag("git_commit", "c0ffee1")]
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags)])


def deployment(endpoint, event, version, run_id, at):
    return DeploymentRecord(endpoint=endpoint, event=event, url=f"http://127.0.0.1:8080/{endpoint}",
                            model_name="digits-classifier", model_version=str(version),
                            model_uri="models:/digits-classifier@champion", run_id=run_id,
                            tracking_uri="sqlite:///mlflow.db", at=at, host="test", pid=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """pipeline run -> training run (v1); pipeline run -> study run -> trial run (v2); an orphan run
    with nothing recorded (v3); a run known only by its dataset input (no tags); endpoints digits
    (v1 then v2, serving) and old (v1, stopped)."""
    tmp_path = tmp_path_factory.mktemp("lineage")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("lineage", artifact_location=(tmp_path / "artifacts").as_uri())
    dataset_tags = {"dataset_md5": MD5, "dataset_source": "sklearn:digits", "git_commit": "c0ffee1"}

    def run(tags):
        created = client.create_run(exp, tags={"mlflow.user": "alice", **tags})
        return created.info.run_id

    pipeline = run({"mlops.run_kind": "pipeline", "prefect_flow_run_id": FLOW_RUN_ID})
    train = run({"mlflow.parentRunId": pipeline, "stage": "train", **dataset_tags})
    log_dataset(client, train, MD5)
    study = run({"mlflow.parentRunId": pipeline, "mlops.run_kind": "study"})
    trial = run({"mlflow.parentRunId": study, "mlops.run_kind": "trial", "optuna_trial": "3", **dataset_tags})
    orphan = run({"stage": "train"})
    input_only = run({"stage": "train"})
    log_dataset(client, input_only, OTHER_MD5, source="data/raw.csv")
    for run_id in (train, trial, orphan):
        store.register_version(client, "digits-classifier", f"runs:/{run_id}/model", run_id, {"dataset_md5": "x"}
                               if run_id == orphan else dataset_tags)
    records = tmp_path / "deployments"
    append_record(records, deployment("digits", "start", 1, train, "2026-01-01T00:00:00+00:00"))
    append_record(records, deployment("digits", "switch", 2, trial, "2026-01-02T00:00:00+00:00"))
    append_record(records, deployment("old", "start", 1, train, "2025-12-01T00:00:00+00:00"))
    append_record(records, deployment("old", "stop", 1, train, "2025-12-02T00:00:00+00:00"))
    return {"uri": uri, "client": client, "records": records, "pipeline": pipeline, "train": train, "study": study,
            "trial": trial, "orphan": orphan, "input_only": input_only, "tmp": tmp_path}


def chain(graph, start):
    """Node ids from ``start`` following each node's first edge."""
    out, node = [start], start
    while graph.children(node):
        node = graph.children(node)[0].target
        out.append(node)
    return out


def test_endpoint_to_raw_source_through_trial_study_and_pipeline(world):
    graph = lineage.lineage_of_endpoint(world["client"], world["records"], "digits")
    assert chain(graph, graph.root) == [
        "endpoint:digits", "version:digits-classifier/2", f"run:{world['trial']}", f"run:{world['study']}",
        f"run:{world['pipeline']}"]
    relations = {(e.source, e.relation, e.target) for e in graph.edges}
    assert ("endpoint:digits", "serves", "version:digits-classifier/2") in relations
    assert (f"run:{world['trial']}", "trained on", f"dataset:{MD5}") in relations
    assert (f"dataset:{MD5}", "prepared from", "raw:sklearn:digits") in relations
    trial = graph.nodes[f"run:{world['trial']}"]
    assert trial.attrs["run_kind"] == "trial" and trial.attrs["optuna_trial"] == "3"
    assert graph.nodes[f"run:{world['pipeline']}"].attrs["prefect_flow_run_id"] == FLOW_RUN_ID
    assert graph.nodes[f"dataset:{MD5}"].attrs["git_commit"] == "c0ffee1"
    assert not [n for n in graph.nodes.values() if n.missing]
    text = to_text(graph)
    assert text.splitlines()[0].startswith("endpoint digits http://127.0.0.1:8080/digits: serving since 2026-01-02")
    assert "trial run" in text and f"prefect_flow_run_id: {FLOW_RUN_ID}" in text and "raw source sklearn:digits" in text


def test_model_version_with_dataset_input_and_endpoints(world):
    graph = lineage.lineage_of_model_version(world["client"], world["records"], "digits-classifier", "1")
    dataset = graph.nodes[f"dataset:{MD5}"]
    assert dataset.attrs["inputs"][0]["digest"] == MD5 and dataset.attrs["inputs"][0]["context"] == "training"
    served = {(e.target, e.relation) for e in graph.children("version:digits-classifier/1")}
    assert ("endpoint:digits", "served by (earlier)") in served and ("endpoint:old", "served by (earlier)") in served
    assert (f"run:{world['train']}", "trained by") in served


def test_missing_links_are_shown_not_fatal(world):
    graph = lineage.lineage_of_model_version(world["client"], world["records"], "digits-classifier", "3")
    missing = sorted(n.label for n in graph.nodes.values() if n.missing)
    assert missing == ["missing: no dataset version recorded on the run or its parents",
                       "missing: no parent pipeline run recorded"]
    mermaid = to_mermaid(graph)
    assert mermaid.startswith("flowchart LR") and "classDef missing" in mermaid
    assert "endpoint" not in to_text(graph)


def test_endpoint_serving_a_deleted_version_follows_the_recorded_run(world):
    append_record(world["records"], deployment("ghost", "start", 9, world["train"], "2026-02-01T00:00:00+00:00"))
    graph = lineage.lineage_of_endpoint(world["client"], world["records"], "ghost")
    missing = [n for n in graph.nodes.values() if n.missing]
    assert [n.label for n in missing] == ["missing: model digits-classifier v9 not in the registry (deleted?)"]
    assert f"run:{world['train']}" in graph.nodes and f"dataset:{MD5}" in graph.nodes


def test_dataset_to_runs_versions_and_endpoints(world):
    graph = lineage.lineage_of_dataset(world["client"], world["records"], MD5)
    assert graph.root == f"dataset:{MD5}"
    runs = {n.attrs["run_id"] for n in graph.of_kind("run")}
    assert runs == {world["train"], world["trial"]}
    versions = {n.attrs["version"] for n in graph.of_kind("model_version")}
    assert versions == {"1", "2"}
    served = {(e.source, e.relation, e.target) for e in graph.edges if e.relation.startswith("served")}
    assert served == {("version:digits-classifier/1", "served by (earlier)", "endpoint:digits"),
                      ("version:digits-classifier/1", "served by (earlier)", "endpoint:old"),
                      ("version:digits-classifier/2", "served by (now)", "endpoint:digits")}


def test_dataset_found_by_its_logged_input_alone(world):
    graph = lineage.lineage_of_dataset(world["client"], world["records"], OTHER_MD5)
    assert [n.attrs["run_id"] for n in graph.of_kind("run")] == [world["input_only"]]
    assert graph.nodes[f"dataset:{OTHER_MD5}"].attrs["source"] == "data/raw.csv"
    assert not graph.of_kind("model_version")


def run_cli(world, capsys, *argv):
    code = 0
    try:
        main(["--tracking-uri", world["uri"], "lineage", *argv, "--records-dir", str(world["records"])])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt", ["text", "json", "mermaid"])
def test_cli_formats(world, capsys, fmt):
    code, out, err = run_cli(world, capsys, "endpoint", "digits", "--format", fmt)
    assert code == 0, err
    if fmt == "json":
        doc = json.loads(out)
        assert doc["root"] == "endpoint:digits"
        assert {n["kind"] for n in doc["nodes"]} == {"endpoint", "model_version", "run", "dataset", "raw_source"}
        version = next(n for n in doc["nodes"] if n["kind"] == "model_version")
        assert version["status"] == "PendingManualApproval" and version["history"] == []
    elif fmt == "mermaid":
        assert out.startswith("flowchart LR") and '-->|"serves"|' in out
    else:
        assert "model digits-classifier v2: PendingManualApproval" in out


@pytest.mark.parametrize("argv, message", [
    (["endpoint", "nope"], "error: endpoint 'nope': no deployment records in"),
    (["dataset", "ffff0000ffff0000ffff0000ffff0000.dir"], "error: dataset 'ffff0000ffff0000ffff0000ffff0000.dir': "
                                                          "no run or model version records it"),
    (["dataset", "x' OR '1"], "error: dataset \"x' OR '1\": expected a digest"),
    (["model", "digits-classifier", "7"], "error: model 'digits-classifier' version 7: not found in the registry"),
    (["model", "unknown-model", "1"], "error: model 'unknown-model' version 1: not found in the registry"),
])
def test_unknown_inputs_are_one_line_errors(world, capsys, argv, message):
    code, out, err = run_cli(world, capsys, *argv)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_records_dir_defaults_to_settings(world, capsys, monkeypatch):
    from tests.conftest import write_settings

    write_settings(world["tmp"], serve={"records_dir": str(world["records"])})
    monkeypatch.chdir(world["tmp"])
    assert os.path.exists("settings.yaml")
    main(["--tracking-uri", world["uri"], "lineage", "model", "digits-classifier", "2", "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert any(e["relation"] == "served by (now)" for e in doc["edges"])
    with pytest.raises(RegistryError):
        lineage.lineage_of_endpoint(world["client"], world["tmp"] / "no-records", "digits")



def test_a_deleted_parent_run_is_shown_missing(world):
    client = world["client"]
    experiment = client.get_run(world["train"]).info.experiment_id
    run = client.create_run(experiment, tags={"mlflow.parentRunId": "0" * 32, "dataset_md5": "1" * 32})
    version = store.register_version(client, "orphans", f"runs:/{run.info.run_id}/model", run.info.run_id, {})
    graph = lineage.lineage_of_model_version(client, world["records"], "orphans", version.version)
    missing = sorted(n.label for n in graph.nodes.values() if n.missing)
    assert missing == ["missing: no raw source recorded", f"missing: parent run {'0' * 32} not found (deleted?)"]


def test_lineage_shows_who_signed_and_what_does_not_verify(tmp_path, monkeypatch, capsys):
    from registry import actions, signing

    monkeypatch.setenv("MLOPS_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MLOPS_APPROVAL_KEYRING", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("signed", artifact_location=(tmp_path / "artifacts").as_uri())
    for k in range(2):
        run_id = client.create_run(exp, tags={"mlflow.user": "alice"}).info.run_id
        (tmp_path / "weights.bin").write_bytes(bytes([k]) * 8)
        client.log_artifact(run_id, str(tmp_path / "weights.bin"), "model")
        store.register_version(client, "m", f"runs:/{run_id}/model", run_id, {})
    actions.approve_version(uri, "m", "1", "fine", approver="bob")
    client.set_model_version_tag("m", "2", "approval_status", "Approved")  # a hand edit
    key_id = signing.Keyring.load().keys[0].key_id
    records = tmp_path / "deployments"
    main(["--tracking-uri", uri, "lineage", "model", "m", "1", "--records-dir", str(records)])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "model m v1: Approved"
    assert f"signature: signed by bob (local user, key {key_id}) at " in out
    main(["--tracking-uri", uri, "lineage", "model", "m", "2", "--records-dir", str(records), "--format", "json"])
    (node,) = [n for n in json.loads(capsys.readouterr().out)["nodes"] if n["kind"] == "model_version"]
    assert (node["status"], node["claimed_status"], node["signed_by"]) == ("PendingManualApproval", "Approved", None)
    assert node["unverified"] == "approval_status says Approved but no signed decision exists"
