"""The promotion flow under a Prefect test harness, on the embedded SQLite store."""

import pytest
from mlflow import MlflowClient

from flows.promotion import PROMOTED, REJECTED_OUTCOME, TIMED_OUT, promotion, start_promotion, wait_for_decision
from ml.errors import ConfigError, RegistryError
from registry import actions, store
from registry.store import VersionRecord
from tests.conftest import run_module, small_params, write_params, write_settings

MODEL = "digits-classifier"


def settings(project, **promotion):
    return write_settings(project, tracking={"uri": f"sqlite:///{project}/mlflow.db"},
                          promotion={"poll_interval_s": 0.1, "timeout_s": 30.0, **promotion})


@pytest.fixture
def registry(project, monkeypatch):
    """v1 approved and champion; v2 pending, from a run alice authored, each with its own weights
    file; the approval key in the project; short polls and timeout."""
    # An absolute URI: MLflow caches one SQLAlchemy engine per URI string, across tests in one process.
    uri = f"sqlite:///{project}/mlflow.db"
    monkeypatch.setenv("MLOPS_CONFIG_DIR", str(project / "config"))
    monkeypatch.delenv("MLOPS_APPROVAL_KEYRING", raising=False)
    write_params(project, small_params())
    settings(project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("promotion", artifact_location=(project / "artifacts").as_uri())
    for k in range(2):
        run = client.create_run(experiment, tags={"mlflow.user": "alice"})
        (project / "weights.bin").write_bytes(bytes([k]) * 64)
        client.log_artifact(run.info.run_id, str(project / "weights.bin"), "model")
        store.register_version(client, MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id, {})
    actions.approve_version(uri, MODEL, "1", "baseline", approver="bob")
    actions.promote_version(uri, MODEL, "1")
    return uri, client


def run_flow(version="2"):
    state = promotion(MODEL, version, return_state=True)
    return state, (state.result() if state.is_completed() else None)


@pytest.mark.slow
def test_approval_given_while_waiting_promotes(prefect_harness, registry, monkeypatch):
    import flows.promotion

    uri, client = registry
    seen = []

    def wait_and_approve_after_the_first_read(read, *args, **kwargs):
        def read_then_decide():
            record = read()
            seen.append(record.status)
            if len(seen) == 1:  # bob decides once the flow has found v2 pending: the next poll sees it
                actions.approve_version(uri, MODEL, "2", "better on the holdout", approver="bob")
            return record
        return wait_for_decision(read_then_decide, *args, **kwargs)

    monkeypatch.setattr(flows.promotion, "wait_for_decision", wait_and_approve_after_the_first_read)
    state, result = run_flow()
    assert seen == ["PendingManualApproval", "Approved"]
    assert state.is_completed() and state.name == PROMOTED, state
    assert result["outcome"] == PROMOTED and result["previous"] == "1"
    assert state.message.startswith(f"{MODEL} v2 approved by bob: better on the holdout; now champion (was v1)")
    assert store.champion(client, MODEL).version == "2"
    last = store.alias_history(client, MODEL)[-1]
    assert (last["version"], last["previous"], last["via"]) == ("2", "1", "promotion flow")
    assert last["flow_run_id"] == str(state.state_details.flow_run_id)


@pytest.mark.slow
def test_rejection_ends_without_touching_the_champion(prefect_harness, registry):
    uri, client = registry
    actions.reject_version(uri, MODEL, "2", "worse on slice 7", approver="bob")
    state, result = run_flow()
    assert state.is_completed() and state.name == REJECTED_OUTCOME
    assert result == {"model_name": MODEL, "version": "2", "alias": "champion", "previous": None,
                      "outcome": REJECTED_OUTCOME, "status": "Rejected", "outside_gate": [], "reverted": None}
    assert "rejected by bob: worse on slice 7; champion untouched" in state.message
    assert store.champion(client, MODEL).version == "1"
    assert len(store.alias_history(client, MODEL)) == 1


@pytest.mark.slow
def test_no_decision_times_out(prefect_harness, registry, project):
    uri, client = registry
    settings(project, timeout_s=0.5)
    state, result = run_flow()
    assert state.is_completed() and state.name == TIMED_OUT
    assert result["outcome"] == TIMED_OUT and result["status"] == "PendingManualApproval"
    assert store.get_version(client, MODEL, "2").history == ()
    assert store.champion(client, MODEL).version == "1"


HAND_EDIT = "approval_status says Approved but no signed decision exists"


def hand_edit(client):
    """What an EDIT user does in the MLflow UI: v2's status tag, then the champion alias."""
    client.set_model_version_tag(MODEL, "2", "approval_status", "Approved")
    client.set_registered_model_alias(MODEL, "champion", "2")


@pytest.mark.slow
def test_a_hand_edited_tag_and_alias_are_reported_not_adopted(prefect_harness, registry, project):
    uri, client = registry
    hand_edit(client)
    settings(project, timeout_s=0.5)
    state, result = run_flow()
    assert state.name == TIMED_OUT and result["status"] == "PendingManualApproval"
    assert result["outside_gate"] == [f"{MODEL} v2: unverified: {HAND_EDIT}",
                                      f"{MODEL}@champion -> v2: champion set outside the gate: {HAND_EDIT}"]
    assert result["reverted"] is None and store.champion(client, MODEL).version == "2"  # reported only
    assert store.get_version(client, MODEL, "2").history == ()


@pytest.mark.slow
def test_an_unverified_champion_is_moved_back_when_configured(prefect_harness, registry, project):
    uri, client = registry
    hand_edit(client)
    settings(project, timeout_s=0.5, revert_unverified_alias=True)
    state, result = run_flow()
    assert state.name == TIMED_OUT
    assert (result["reverted"]["version"], result["reverted"]["previous"]) == ("1", "2")
    assert store.champion(client, MODEL).version == "1"
    assert store.alias_history(client, MODEL)[-1] == result["reverted"]


@pytest.mark.slow
def test_a_status_edited_after_a_rejection_stays_rejected(prefect_harness, registry):
    uri, client = registry
    actions.reject_version(uri, MODEL, "2", "no", approver="bob")
    client.set_model_version_tag(MODEL, "2", "approval_status", "Approved")
    state, result = run_flow()
    assert state.name == REJECTED_OUTCOME and "rejected by bob: no" in state.message
    assert result["outside_gate"] == [
        f"{MODEL} v2: unverified: approval_status says Approved but the signed decision is Rejected"]
    assert store.champion(client, MODEL).version == "1"
    assert len(store.get_version(client, MODEL, "2").history) == 1


@pytest.mark.slow
def test_unknown_version_fails(prefect_harness, registry):
    state, _ = run_flow("9")
    assert state.is_failed()
    with pytest.raises(RegistryError, match="version 9: not found"):
        state.result()


@pytest.mark.slow
def test_start_promotion_creates_a_run_of_the_deployment(prefect_harness, registry, project):
    from prefect import get_client

    assert start_promotion(MODEL, "2") is None  # promotion.after_training is false
    settings(project, after_training=True)
    with pytest.raises(ConfigError, match="deployment 'promotion/missing' not found"):
        start_promotion(MODEL, "2", deployment="promotion/missing")
    promotion.to_deployment(name="local").apply()
    flow_run_id = start_promotion(MODEL, "2")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.parameters == {"model_name": MODEL, "version": "2"}
    assert flow_run.state.is_scheduled()


def record(status, history=()):
    return VersionRecord(MODEL, "2", status, None, "", (), {}, tuple(history))


def test_wait_for_decision_reads_until_decided_or_timed_out():
    statuses = iter(["PendingManualApproval", "PendingManualApproval", "Approved"])
    now = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    decided = wait_for_decision(lambda: record(next(statuses)), 10, 3, sleep=sleep, clock=lambda: now[0])
    assert decided.status == "Approved" and sleeps == [3, 3]
    now[0] = 0.0
    sleeps.clear()
    assert wait_for_decision(lambda: record("PendingManualApproval"), 7, 3, sleep=sleep, clock=lambda: now[0]) is None
    assert sleeps == [3, 3, 1]


@pytest.mark.slow
def test_command_line_entry(registry, project):
    uri, _ = registry
    env = {"PREFECT_HOME": str(project / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = run_module("flows.promotion", "--model", MODEL, "--version", "9", cwd=project, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: model '{MODEL}' version 9: not found in the registry"]
    actions.reject_version(uri, MODEL, "2", "worse", approver="bob")
    done = run_module("flows.promotion", "--model", MODEL, "--version", "2", cwd=project, env=env)
    assert done.returncode == 1 and done.stdout.strip(), done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == f"{MODEL} v2 was rejected by bob: worse; champion untouched"
