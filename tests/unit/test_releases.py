"""Production releases tied to the registry (registry/releases.py): promotion publishes a semver
release in the production checkpoint tier and tags it on the version, rollback names the release
that is live again, an existing release is never overwritten, and the endpoint refuses weights that
are not the release's. On the embedded SQLite store, with real MLflow PyTorch models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from ml.errors import RegistryError
from registry.releases import (RELEASE_SHA256_TAG, RELEASE_VERSION_TAG, RELEASE_WEIGHTS_TAG, ReleaseExists,
                               ReleaseMismatch, check_release_weights, next_release_version, weights_sha256)

MODEL = "digits"
FEATURES = [f"f{i}" for i in range(4)]
CLASSES = ["a", "b", "c"]


@pytest.mark.parametrize("existing, breaking, expected", [
    ([], False, "1.0.0"),
    ([], True, "1.0.0"),
    (["1.0.0"], False, "1.1.0"),
    (["1.0.0", "1.1.0"], True, "2.0.0"),
    (["1.0.0", "2.0.0", "1.9.0"], False, "2.1.0"),
    (["1.10.0", "1.9.0"], False, "1.11.0"),  # numeric, not lexical
    (["1.2.3-rc.1+build.5"], False, "1.3.0"),
])
def test_next_release_version(existing, breaking, expected):
    assert next_release_version(existing, breaking) == expected


def test_next_release_version_refuses_a_tag_that_is_no_semver():
    with pytest.raises(RegistryError, match=r"^release version 'v1': expected a semantic version"):
        next_release_version(["v1"], False)


def test_weights_digest_covers_names_dtypes_shapes_and_values_not_order():
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(3, dtype=torch.bfloat16)
    base = weights_sha256({"a": a, "b": b})
    assert weights_sha256({"b": b, "a": a.clone()}) == base
    assert weights_sha256({"a": a.t().contiguous().t(), "b": b}) == base  # layout in memory does not count
    for other in ({"a": a.reshape(3, 2), "b": b}, {"a": a.double(), "b": b}, {"a2": a, "b": b},
                  {"a": a + 1e-6, "b": b}, {"a": a}):
        assert weights_sha256(other) != base


def test_a_version_without_a_release_passes_and_one_with_another_digest_is_refused():
    weights = {"w": torch.zeros(2)}
    check_release_weights(MODEL, "1", {}, weights)
    tags = {RELEASE_VERSION_TAG: "1.0.0", RELEASE_WEIGHTS_TAG: weights_sha256(weights)}
    check_release_weights(MODEL, "1", tags, weights)
    with pytest.raises(ReleaseMismatch, match=r"^digits v1: its weights are not those of release 1\.0\.0 "):
        check_release_weights(MODEL, "1", tags, {"w": torch.ones(2)})


# -- on the embedded store ------------------------------------------------------------------------------

def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(len(FEATURES), 8), torch.nn.ReLU(), torch.nn.Linear(8, len(CLASSES)))


def save_pytorch_model(model: torch.nn.Module, path) -> None:
    import mlflow.pytorch
    from mlflow.models import infer_signature

    example = torch.zeros(2, len(FEATURES)).numpy()
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    mlflow.pytorch.save_model(model, str(path), signature=signature, input_example=example, pip_requirements=["torch"])


@pytest.fixture
def registry(tmp_path, empty_store, monkeypatch):
    """Three PyTorch versions of "digits" from runs alice authored, registered as the register stage
    does (dataset, contract, test accuracy; v3 with a breaking change), all approved by bob; the
    checkpoint settings point at the test's own root."""
    import shutil

    from mlflow import MlflowClient

    from ml.settings import CheckpointConfig
    from registry import actions, store

    monkeypatch.setenv("MLOPS_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MLOPS_APPROVAL_KEYRING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("releases", artifact_location=(tmp_path / "artifacts").as_uri())
    signature = json.dumps({"inputs": [[f, "float32"] for f in FEATURES], "classes": CLASSES})
    for k in range(3):
        run = client.create_run(exp, tags={"mlflow.user": "alice"})
        client.log_param(run.info.run_id, "train.lr", "0.01")
        client.log_metric(run.info.run_id, "val_accuracy", 0.9 + k / 100)
        client.log_metric(run.info.run_id, "test_accuracy", 0.91 + k / 100)
        client.log_metric(run.info.run_id, "system/cpu_utilization_percentage", 50.0)
        save_pytorch_model(small_model(k), tmp_path / f"model-{k}")
        client.log_artifacts(run.info.run_id, str(tmp_path / f"model-{k}"), "model")
        tags = {"dataset_md5": f"md5-{k}.dir", "dataset_source": "data/raw/digits.csv",
                "dataset_path": "data/processed", "git_commit": f"c0ffee{k}", "test_accuracy": f"{0.91 + k / 100:.6f}",
                "contract_path": "gx/expectations/digits.json", "contract_version": "1", "input_signature": signature}
        if k == 2:
            tags["breaking_change"] = "classes differ from champion v2's"
        store.register_version(client, MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id, tags)
        actions.approve_version(uri, MODEL, str(k + 1), "good", approver="bob")
    return uri, client, CheckpointConfig(dir=str(tmp_path / "checkpoints"))


def production(checkpoint) -> list[str]:
    from ml.checkpoint.reader import CheckpointReader

    return sorted(CheckpointReader(checkpoint.dir).list("production"))


def test_promotion_publishes_minor_then_major_releases_tagged_on_the_version(registry):
    from ml.checkpoint.reader import CheckpointReader
    from registry import actions, store

    uri, client, checkpoint = registry
    record = actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    assert record.tags[RELEASE_VERSION_TAG] == "1.0.0" and production(checkpoint) == ["1.0.0"]
    where = CheckpointReader(checkpoint.dir).tier_dir("production") / "1.0.0"
    assert sorted(p.name for p in where.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                       "model_card.json"]
    assert record.tags[RELEASE_SHA256_TAG] == hashlib.sha256((where / "model.safetensors").read_bytes()).hexdigest()
    released = CheckpointReader(checkpoint.dir).load_production("1.0.0")
    served = {k: v for k, v in small_model(0).state_dict().items()}
    assert released.weights.keys() == served.keys()
    assert all(torch.equal(released.weights[k], served[k]) for k in served)
    assert record.tags[RELEASE_WEIGHTS_TAG] == weights_sha256(served)
    assert str(where.resolve()) == record.tags["release_location"]

    card = released.model_card
    assert card["version"] == "1.0.0"
    assert card["dataset"] == {"md5": "md5-0.dir", "source": "data/raw/digits.csv", "path": "data/processed",
                               "git_commit": "c0ffee0"}
    assert card["metrics"] == {"val_accuracy": 0.9, "test_accuracy": 0.91}
    assert card["description"].startswith(f"{MODEL} v1: PyTorch classifier over 4 features to 3 classes (a, b, c)")
    assert "gx/expectations/digits.json v1" in card["intended_use"] and f"{MODEL}@champion" in card["intended_use"]
    assert "test split of dataset md5-0.dir (test accuracy 0.910000)" in card["limitations"]
    assert (card["source"]["model"], card["source"]["model_version"], card["source"]["approved_by"]) == (
        MODEL, "1", "bob")
    assert card["source"]["weights_digest"] == store.weights_digest(client, MODEL, "1")
    assert released.config["classes"] == CLASSES and released.config["features"] == FEATURES
    assert released.config["training"] == {"train.lr": "0.01"}

    assert actions.promote_version(uri, MODEL, "2", checkpoint=checkpoint).tags[RELEASE_VERSION_TAG] == "1.1.0"
    third = actions.promote_version(uri, MODEL, "3", checkpoint=checkpoint)
    assert third.tags[RELEASE_VERSION_TAG] == "2.0.0"  # registered with register.allow_breaking_change
    assert "breaking change from the previous champion" in CheckpointReader(checkpoint.dir).load_production(
        "2.0.0").model_card["limitations"]
    assert production(checkpoint) == ["1.0.0", "1.1.0", "2.0.0"]
    assert [(h["version"], h.get("release")) for h in store.alias_history(client, MODEL)] == [
        ("1", "1.0.0"), ("2", "1.1.0"), ("3", "2.0.0")]


def test_rollback_records_the_release_live_again_and_publishes_nothing(registry, capsys):
    from mlops.cli import main
    from registry import actions, store

    uri, client, checkpoint = registry
    actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    actions.promote_version(uri, MODEL, "2", checkpoint=checkpoint)
    settings = checkpoint_settings(registry)
    capsys.readouterr()
    main(["--settings", str(settings), "--tracking-uri", uri, "models", "rollback", MODEL])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{MODEL} v1 [champion]: Approved"
    assert "  release: 1.0.0 at " in out
    assert store.champion(client, MODEL).version == "1"
    last = store.alias_history(client, MODEL)[-1]
    assert (last["version"], last["previous"], last["release"], last["via"]) == ("1", "2", "1.0.0", "rollback")
    assert production(checkpoint) == ["1.0.0", "1.1.0"]
    assert latest_release(checkpoint) == "1.0.0"  # the pointer follows the live release
    actions.promote_version(uri, MODEL, "2", checkpoint=checkpoint)  # promoted again: its own release is live
    assert store.alias_history(client, MODEL)[-1]["release"] == "1.1.0"
    assert production(checkpoint) == ["1.0.0", "1.1.0"]
    assert latest_release(checkpoint) == "1.1.0"


def latest_release(checkpoint) -> str:
    from ml.checkpoint.reader import CheckpointReader

    return CheckpointReader(checkpoint.dir).pointers("production")["latest"]


def checkpoint_settings(registry):
    import yaml

    _, _, checkpoint = registry
    path = Path(checkpoint.dir).parent / "settings.yaml"
    path.write_text(yaml.safe_dump({"checkpoint": {"dir": checkpoint.dir}}))
    return path


def test_an_existing_release_version_is_never_overwritten(registry, capsys):
    from ml.checkpoint.manager import CheckpointManager
    from mlops.cli import main
    from registry import store

    uri, client, checkpoint = registry
    with CheckpointManager(checkpoint.dir) as manager:  # e.g. `mlops checkpoints export ... --version 1.0.0`
        manager.save_production_checkpoint({"w": torch.ones(2)}, "1.0.0", {}, {"description": "by hand"})
    before = {p.name: p.read_bytes() for p in (manager.tier_dir("production") / "1.0.0").iterdir()}
    with pytest.raises(SystemExit) as exc:
        main(["--settings", str(checkpoint_settings(registry)), "--tracking-uri", uri, "models", "promote", MODEL,
              "1"])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: promote {MODEL} v1: release 1.0.0 already exists at ")
    assert "(from another publisher); releases are never overwritten" in err
    assert {p.name: p.read_bytes() for p in (manager.tier_dir("production") / "1.0.0").iterdir()} == before
    assert store.champion(client, MODEL) is None
    assert RELEASE_VERSION_TAG not in store.get_version(client, MODEL, "1").tags


def test_a_release_written_before_its_tags_is_adopted_by_the_next_promotion(registry):
    """A promotion that stopped between the release and the tags: promoting again finds the
    version's own release in the tier and finishes, instead of refusing or publishing another."""
    from registry import actions, store

    uri, client, checkpoint = registry
    actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    for tag in (RELEASE_VERSION_TAG, RELEASE_SHA256_TAG, RELEASE_WEIGHTS_TAG, "release_location"):
        client.delete_model_version_tag(MODEL, "1", tag)
    client.delete_registered_model_alias(MODEL, "champion")
    record = actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    assert record.tags[RELEASE_VERSION_TAG] == "1.0.0" and production(checkpoint) == ["1.0.0"]
    assert store.champion(client, MODEL).version == "1"
    with pytest.raises(ReleaseExists, match=r"release 1\.0\.0 already exists .* \(from digits v1\)"):
        client.delete_model_version_tag(MODEL, "1", RELEASE_VERSION_TAG)
        actions.promote_version(uri, MODEL, "2", checkpoint=checkpoint)  # v2's weights are not that release's


def test_an_unapproved_version_is_refused_before_anything_is_written(registry):
    from registry import actions

    uri, client, checkpoint = registry
    actions.reject_version(uri, MODEL, "1", "regressed", approver="bob")
    with pytest.raises(RegistryError, match=r"^version 1 is Rejected; only an Approved version can become champion"):
        actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    assert not Path(checkpoint.dir).exists()


def test_the_endpoint_refuses_weights_that_are_not_the_release(registry, tmp_path):
    """After the release, the version's weights are replaced and approved again (a signed record over
    the new files): the approval verifies, the release does not, and nothing is served."""
    import shutil

    from deploy.serve import ModelServer, UnverifiedVersion, load_version
    from ml.settings import ServeConfig
    from registry import actions, store
    from registry.signing import ApprovalRecord, load_private_key, sign, signer_key_id

    uri, client, checkpoint = registry
    actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    served = load_version(client, uri, MODEL, "1")
    assert served.version == "1"

    original = store.get_version(client, MODEL, "1")
    artifacts = Path(client.get_run(original.run_id).info.artifact_uri.removeprefix("file://")) / "model"
    save_pytorch_model(small_model(7), tmp_path / "other")
    shutil.copy(tmp_path / "other" / "data" / "model.pt2", artifacts / "data" / "model.pt2")  # other weights
    with pytest.raises(UnverifiedVersion, match="^the weights' digest .* differs from the signed"):
        load_version(client, uri, MODEL, "1")  # the signed approval names the old files

    key = load_private_key()
    record = ApprovalRecord(MODEL, "1", store.weights_digest(client, MODEL, "1"), "Approved", "bob",
                            "2026-01-01T00:00:00+00:00", "re-approved", False, "local user", signer_key_id(key))
    client.set_model_version_tag(MODEL, "1", "approval_signature", sign(record, key))
    assert store.verify_version(client, store.get_version(client, MODEL, "1")).approved
    with pytest.raises(ReleaseMismatch) as exc:
        load_version(client, uri, MODEL, "1")
    assert len(str(exc.value).splitlines()) == 1
    assert str(exc.value).startswith(f"{MODEL} v1: its weights are not those of release 1.0.0 (weights sha256 ")
    assert original.tags[RELEASE_WEIGHTS_TAG][:16] in str(exc.value)
    server = ModelServer(ServeConfig(records_dir=str(tmp_path / "deployments")), uri, MODEL, "http://127.0.0.1:1")
    with pytest.raises(RegistryError) as refused:  # what `mlops serve` prints at start, on one line
        server.load_alias()
    assert str(refused.value) == f"{MODEL}@champion: {exc.value}; nothing served"
    assert server.served is None and not (tmp_path / "deployments").exists()


def test_lineage_shows_the_release_and_whether_it_is_live(registry, tmp_path):
    from lineage.graph import lineage_of_dataset, lineage_of_model_version
    from lineage.render import render
    from registry import actions

    uri, client, checkpoint = registry
    actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    actions.promote_version(uri, MODEL, "2", checkpoint=checkpoint)
    records = tmp_path / "deployments"
    graph = lineage_of_model_version(client, records, MODEL, "2")
    (release,) = graph.of_kind("release")
    assert (release.attrs["release"], release.attrs["live"]) == ("1.1.0", True)
    assert release.attrs["sha256"] == client.get_model_version(MODEL, "2").tags[RELEASE_SHA256_TAG]
    text = render(graph, "text")
    assert "released as: production release 1.1.0 (live as champion)" in text
    assert f"model.safetensors sha256: {release.attrs['sha256']}" in text
    earlier = lineage_of_dataset(client, records, "md5-0.dir")
    assert [(n.label, n.attrs["live"]) for n in earlier.of_kind("release")] == [("production release 1.0.0", False)]
    assert not lineage_of_model_version(client, records, MODEL, "3").of_kind("release")  # never promoted


def test_the_promotion_flows_promote_step_names_the_release(registry):
    from flows.promotion import _promote
    from registry import store

    uri, client, checkpoint = registry
    assert _promote(uri, MODEL, "1", "champion", None, checkpoint) == {"previous": None, "aliases": ["champion"],
                                                                       "release": "1.0.0"}
    assert _promote(uri, MODEL, "2", "champion", "run-1", checkpoint)["release"] == "1.1.0"
    assert store.alias_history(client, MODEL)[-1] == {**store.alias_history(client, MODEL)[-1],
                                                      "via": "promotion flow", "flow_run_id": "run-1",
                                                      "release": "1.1.0"}
    assert _promote(uri, MODEL, "3", "staging", None, checkpoint)["release"] is None  # only champion is released
    assert production(checkpoint) == ["1.0.0", "1.1.0"]
