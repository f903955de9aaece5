from datetime import UTC, datetime

import pytest

from ml.errors import RegistryError
from registry.approval import (APPROVED, PENDING, REJECTED, can_promote, check_approver, check_transition,
                               is_better_than_champion, make_event, meets_quality_gate)


@pytest.mark.parametrize("current, target, legal", [
    (PENDING, APPROVED, True),
    (PENDING, REJECTED, True),
    (APPROVED, REJECTED, True),
    (APPROVED, APPROVED, False),
    (APPROVED, PENDING, False),
    (REJECTED, APPROVED, False),
    (REJECTED, PENDING, False),
    (REJECTED, REJECTED, False),
    (PENDING, PENDING, False),
    (PENDING, "Archived", False),
])
def test_transition_table(current, target, legal):
    if legal:
        check_transition(current, target)
    else:
        with pytest.raises(RegistryError):
            check_transition(current, target)


def test_illegal_transition_message_lists_what_is_allowed():
    with pytest.raises(RegistryError, match=r"^illegal transition Rejected -> Approved; from Rejected allowed: none"):
        check_transition(REJECTED, APPROVED)


@pytest.mark.parametrize("approver, author, allow, outcome", [
    ("alice", "bob", False, False),
    ("alice", None, False, False),
    ("bob", "bob", True, True),
    ("bob", "bob", False, RegistryError),
    ("", "bob", False, RegistryError),
])
def test_separation_of_duties(approver, author, allow, outcome):
    if outcome is RegistryError:
        with pytest.raises(RegistryError):
            check_approver(approver, author, allow)
    else:
        assert check_approver(approver, author, allow) is outcome


def test_event_records_who_when_why():
    event = make_event(PENDING, APPROVED, "alice", "  fine  ", False, now=datetime(2026, 1, 2, tzinfo=UTC))
    assert event.to_dict() == {"from_status": PENDING, "to_status": APPROVED, "by": "alice",
                               "at": "2026-01-02T00:00:00+00:00", "reason": "fine", "self_approval": False,
                               "via": "cli"}
    with pytest.raises(RegistryError, match="reason"):
        make_event(PENDING, APPROVED, "alice", " ", False)


@pytest.mark.parametrize("status, ok", [(APPROVED, True), (PENDING, False), (REJECTED, False)])
def test_only_approved_is_promotable(status, ok):
    assert can_promote(status) is ok


@pytest.mark.parametrize("accuracy, threshold, ok", [(0.95, 0.9, True), (0.9, 0.9, True), (0.89, 0.9, False)])
def test_quality_gate(accuracy, threshold, ok):
    passed, why = meets_quality_gate({"accuracy": accuracy}, threshold)
    assert passed is ok and f"{threshold:.4f}" in why


@pytest.mark.parametrize("challenger, champion, delta, ok", [
    (0.95, 0.90, 0.0, True),
    (0.90, 0.90, 0.0, True),
    (0.89, 0.90, 0.0, False),
    (0.91, 0.90, 0.02, False),
    (0.89, 0.90, -0.02, True),
])
def test_champion_challenger_gate(challenger, champion, delta, ok):
    passed, why = is_better_than_champion(challenger, champion, "3", delta)
    assert passed is ok
    assert f"{challenger:.4f}" in why and f"{champion:.4f}" in why and "champion v3" in why
    assert ("below register.champion_min_delta" in why) is not ok


# -- the registry side, on a real embedded SQLite store -------------------------------------------------

@pytest.fixture
def registry(tmp_path, empty_store, monkeypatch):
    """Three versions of "m" with their own small weights file, from runs alice authored; the
    approval key and keyring in a fresh config directory."""
    import shutil

    from mlflow import MlflowClient

    from registry import store

    monkeypatch.setenv("MLOPS_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MLOPS_APPROVAL_KEYRING", raising=False)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("approval", artifact_location=(tmp_path / "artifacts").as_uri())
    for k in range(3):
        run = client.create_run(exp, tags={"mlflow.user": "alice"})
        weights = tmp_path / "weights.bin"
        weights.write_bytes(bytes([k]) * 64)
        client.log_artifact(run.info.run_id, str(weights), "model")
        store.register_version(client, "m", f"runs:/{run.info.run_id}/model", run.info.run_id,
                               {"test_accuracy": "0.950000", "champion_gate": "passed", "champion_version": "1",
                                "champion_test_accuracy": "0.900000", "champion_delta": "+0.050000"})
    return uri, client


def test_a_hand_edited_status_is_not_adopted_by_a_decision(registry):
    from registry import actions

    uri, client = registry
    client.set_model_version_tag("m", "1", "approval_status", APPROVED)  # what the MLflow UI does
    record = actions.reject_version(uri, "m", "1", "regressed on slice X", approver="carol")
    assert [(e["from_status"], e["to_status"], e["by"]) for e in record.history] == [(PENDING, REJECTED, "carol")]
    assert record.status == REJECTED
    client.set_model_version_tag("m", "2", "approval_status", APPROVED)
    with pytest.raises(RegistryError, match=r"^version 2 is PendingManualApproval; only an Approved version can "
                                            r"become champion \(approval_status says Approved but no signed"):
        actions.promote_version(uri, "m", "2")


def test_promote_rollback_and_reject_move_aliases(registry):
    from registry import actions, store

    uri, client = registry
    for version in ("1", "2"):
        actions.approve_version(uri, "m", version, "good", approver="bob")
        actions.promote_version(uri, "m", version)
    assert store.champion(client, "m").version == "2"
    assert [(h["version"], h["previous"]) for h in store.alias_history(client, "m")] == [("1", None), ("2", "1")]
    assert actions.rollback_alias(uri, "m").version == "1"
    actions.promote_version(uri, "m", "2", alias="staging")
    assert store.champion(client, "m", "staging").version == "2"
    assert "staging_history" in client.get_registered_model("m").tags
    actions.reject_version(uri, "m", "2", "revoked", approver="bob")
    assert store.champion(client, "m", "staging") is None and store.champion(client, "m").version == "1"


def test_refusals_change_nothing(registry):
    from registry import actions, store

    uri, client = registry
    before = store.get_version(client, "m", "3")
    with pytest.raises(RegistryError, match="only an Approved version can become champion"):
        actions.promote_version(uri, "m", "3")
    with pytest.raises(RegistryError, match="approver 'alice' is the author of the source run"):
        actions.approve_version(uri, "m", "3", "mine", approver="alice")
    with pytest.raises(RegistryError, match="no champion; nothing to roll back"):
        actions.rollback_alias(uri, "m")
    assert store.get_version(client, "m", "3") == before
    assert not client.get_registered_model("m").aliases


def test_cli_models_on_the_embedded_store(registry, capsys, monkeypatch):
    from mlops.cli import main

    uri, _ = registry
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    main(["--tracking-uri", uri, "models", "approve", "m", "1", "--reason", "ok", "--approver", "bob"])
    main(["--tracking-uri", uri, "models", "promote", "m", "1"])
    capsys.readouterr()
    main(["--tracking-uri", uri, "models", "list", "m"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("m v1 [champion]: Approved  accuracy=0.950000  vs champion v1 0.9000: +0.0500 (passed)")
    assert len(lines) == 3
    with pytest.raises(SystemExit) as exc:
        main(["--tracking-uri", uri, "models", "show", "m", "9"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: model 'm' version 9: not found in the registry"


def test_self_approval_is_allowed_only_by_the_flag_and_recorded_in_the_history(registry, capsys, monkeypatch):
    from mlops.cli import main
    from registry import store

    uri, client = registry
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    approve = ["--tracking-uri", uri, "models", "approve", "m", "3", "--reason", "mine", "--approver", "alice"]
    with pytest.raises(SystemExit) as exc:  # alice authored the run of every version
        main(approve)
    assert exc.value.code != 0 and not store.get_version(client, "m", "3").history
    main(["--tracking-uri", uri, "models", "approve", "m", "1", "--reason", "ok", "--approver", "bob"])
    main([*approve, "--allow-self-approval"])
    capsys.readouterr()
    assert [(e["by"], e["self_approval"]) for e in store.get_version(client, "m", "1").history] == [("bob", False)]
    (event,) = store.get_version(client, "m", "3").history
    assert (event["by"], event["to_status"], event["self_approval"]) == ("alice", APPROVED, True)
    main(["--tracking-uri", uri, "models", "show", "m", "3"])
    assert any("-> Approved by alice (self-approval)" in line for line in capsys.readouterr().out.splitlines())


def test_registering_a_name_another_run_created_meanwhile_adds_a_version(registry):
    """Two flow runs registering a new name at once: the one whose create loses the race still
    registers its version under the name the other created."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from registry import store

    _, client = registry

    class LateClient:  # sees the name as missing, as a run that looked just before the other created it
        def __getattr__(self, attr):
            return getattr(client, attr)

        def get_registered_model(self, name):
            raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)

    run = client.search_runs([client.get_experiment_by_name("approval").experiment_id])[0]
    record = store.register_version(LateClient(), "m", f"runs:/{run.info.run_id}/model", run.info.run_id, {})
    assert record.version == "4" and record.status == PENDING
