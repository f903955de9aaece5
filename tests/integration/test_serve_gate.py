"""``mlops serve`` serves only versions whose signed approval verifies, on the embedded store.

Versions 1 and 2 (two small MLPs logged with MLflow) are approved through the registry (signed);
version 3 holds version 2's weights and no approval. What an EDIT user can do by hand (the status
tag, the alias, a copied signature) and a valid signature over other weights are never served,
across alias moves under 4 looping clients, and a later approval through the CLI is.

``python -m tests.integration.test_serve_gate`` builds that registry in the current directory and
prints it as JSON; it runs in its own process, since logging a model sets MLflow's process-wide URIs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mlops import services
from tests.conftest import PYTHON, REPO, run_module, write_settings
from tests.integration.serving_setup import LoopingClients

pytestmark = pytest.mark.slow

MODEL = "gate-classifier"
ENDPOINT = "gate-test"
POLL_S = 0.5
HAND_EDIT = "approval_status says Approved but no signed decision exists"


@dataclass(frozen=True)
class Project:
    path: Path
    tracking_uri: str
    name: str
    versions: list[str]  # [v1, v2, v3]: v3 holds v2's weights, unapproved
    env: dict[str, str]

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


def build() -> None:
    """Two small MLPs logged and registered from runs alice authored, both approved by bob (signed
    with the key under $MLOPS_CONFIG_DIR), v1 champion; v3 registered again from v2's model."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow import MlflowClient

    from ml.model.architectures import MLP, ModelSpec
    from registry import store

    uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("gate", artifact_location=(Path.cwd() / "artifacts").as_uri())
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MLP(ModelSpec(64, (16,), 10, 0.0)).eval()
        run = client.create_run(experiment, tags={"mlflow.user": "alice"})
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pytorch.log_model(model, name="model", input_example=np.zeros((2, 64), dtype=np.float32),
                                            pip_requirements=["torch"])
        version = store.register_version(client, MODEL, info.model_uri, run.info.run_id, {}).version
        store.decide(client, MODEL, version, "Approved", "bob", "gate test")
        versions.append(version)
    store.promote(client, MODEL, versions[0], "bob")
    second = client.get_model_version(MODEL, versions[1])
    versions.append(store.register_version(client, MODEL, second.source, second.run_id, {}).version)
    print(json.dumps({"tracking_uri": uri, "versions": versions}))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    path = tmp_path_factory.mktemp("serve-gate")
    write_settings(path, tracking={"uri": f"sqlite:///{path / 'mlflow.db'}"},
                   serve={"endpoint": ENDPOINT, "poll_interval_s": POLL_S})
    patch = pytest.MonkeyPatch()  # this process signs and verifies with the project's keys too
    patch.setenv("MLOPS_CONFIG_DIR", str(path / "config"))
    patch.delenv("MLOPS_APPROVAL_KEYRING", raising=False)
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO)}
    done = run_module("tests.integration.test_serve_gate", cwd=path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    yield Project(path, info["tracking_uri"], MODEL, info["versions"], env)
    patch.undo()


def move(project, version):
    project.client().set_registered_model_alias(project.name, "champion", version)


def hand_approve(project, version):
    """The MLflow UI's "approval": the status tag edited by hand."""
    project.client().set_model_version_tag(project.name, version, "approval_status", "Approved")


def test_refuses_to_start_on_a_champion_set_by_hand(project):
    v1, _, v3 = project.versions
    hand_approve(project, v3)
    move(project, v3)
    try:
        done = subprocess.run([PYTHON, "-m", "mlops.cli", "serve", "--name", MODEL, "--port", "0"], cwd=project.path,
                              env=project.env, capture_output=True, text=True, timeout=180)
    finally:
        move(project, v1)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {project.name}@champion names v{v3}, whose approval does not verify: {HAND_EDIT}; nothing served "
        "(approve it with `mlops models approve`, or move champion back)")


@pytest.fixture(scope="module")
def endpoint(project):
    port = services.free_port()
    log_path = project.path / "serve.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([PYTHON, "-m", "mlops.cli", "serve", "--name", MODEL, "--port", str(port)],
                                cwd=project.path,
                                env=project.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        services.wait_http(f"{url}/health", timeout=120, proc=proc)
        yield url, log_path
    finally:
        services.stop(proc)


def wait_for(check, what, timeout=60.0):
    """Polls ``check()`` until it returns something true; fails naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def not_served(url, version, fragment):
    """/health once it reports that the alias names ``version`` and why (containing ``fragment``)."""
    def check():
        health = httpx.get(f"{url}/health", timeout=10).json()
        return health if health.get("alias_target") == version and fragment in health.get("mismatch", "") else None
    return wait_for(check, f"/health reporting v{version} not served ({fragment})")


def forge_over_other_weights(project, version, weights_of):
    """A valid signature with the approval key for ``version``, over ``weights_of``'s digest."""
    from registry import signing, store

    client = project.client()
    key = signing.load_private_key(create=False)
    record = signing.ApprovalRecord(project.name, version, store.weights_digest(client, project.name, weights_of),
                                    "Approved", "mallory", "2026-01-01T00:00:00+00:00", "forged", False,
                                    "local user", signing.signer_key_id(key))
    client.set_model_version_tag(project.name, version, signing.SIGNATURE_TAG, signing.sign(record, key))


def test_alias_moves_outside_the_gate_are_never_served_under_load(endpoint, project):
    from registry import signing

    url, log_path = endpoint
    v1, v2, v3 = project.versions
    client = project.client()
    hand_approve(project, v3)
    width = httpx.get(f"{url}/info", timeout=10).json()["input"]["width"]
    payloads = [json.dumps({"inputs": [[float(i % 16)] * width]}).encode() for i in range(8)]
    with LoopingClients(url, payloads, clients=4) as clients:
        clients.wait_until_each(lambda a: a.model_version == v1, [0] * 4, 60, f"a v{v1} answer")
        since = clients.counts()
        move(project, v2)
        clients.wait_until_each(lambda a: a.model_version == v2, since, 60, f"a v{v2} answer after the move")

        move(project, v3)  # the alias set by hand on a version whose status tag was set by hand
        health = not_served(url, v3, HAND_EDIT)
        assert health["model_version"] == v2 and health["status"] == "ready"
        copied = client.get_model_version(project.name, v2).tags[signing.SIGNATURE_TAG]
        client.set_model_version_tag(project.name, v3, signing.SIGNATURE_TAG, copied)
        not_served(url, v3, f"the signed record is for {project.name} v{v2}, not this version")
        forge_over_other_weights(project, v3, weights_of=v1)
        not_served(url, v3, "the weights' digest")
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert (info["alias_target"], info["model_version"]) == (v3, v2)
        assert info["alias_unverified"]["version"] == v3 and "weights' digest" in info["alias_unverified"]["why"]

        since = clients.counts()
        move(project, v1)
        clients.wait_until_each(lambda a: a.model_version == v1, since, 60, f"a v{v1} answer after moving back")
        assert "mismatch" not in httpx.get(f"{url}/health", timeout=10).json()
        assert clients.dead() == []
        clients.stop()
    answers = [a for client_answers in clients.answers for a in client_answers]
    assert [a for a in answers if a.status != 200] == []
    assert {a.model_version for a in answers} == {v1, v2}  # never v3
    errors = [line for line in log_path.read_text().splitlines()
              if f"names v{v3}, whose approval does not verify" in line]
    assert len(errors) == 3, errors  # one line per reason, not one per poll
    assert [HAND_EDIT in errors[0], "signed record is for" in errors[1], "weights' digest" in errors[2]] == [True] * 3


def test_a_legitimate_approval_is_served_at_the_next_poll(endpoint, project, capsys):
    from mlops.cli import main
    from registry import signing

    url, _ = endpoint
    _, _, v3 = project.versions
    client = project.client()
    client.delete_model_version_tag(project.name, v3, signing.SIGNATURE_TAG)  # only the hand-edited status is left
    move(project, v3)
    not_served(url, v3, HAND_EDIT)
    main(["--tracking-uri", project.tracking_uri, "models", "approve", project.name, v3, "--reason", "reviewed",
          "--approver", "carol"])
    approved_at = time.monotonic()
    capsys.readouterr()
    info = wait_for(lambda: (i := httpx.get(f"{url}/info", timeout=10).json())["model_version"] == v3 and i,
                    f"v{v3} served after its approval")
    print(f"v{v3} served {time.monotonic() - approved_at:.2f} s after `mlops models approve` returned "
          f"(serve.poll_interval_s {POLL_S})")
    assert info["alias_unverified"] is None and info["approval"].startswith("signed by carol (local user, key ")
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ready", "model_version": v3}

    # the served version's signature removed by hand: it stays served (verified when loaded), reported
    client.delete_model_version_tag(project.name, v3, signing.SIGNATURE_TAG)
    health = not_served(url, v3, HAND_EDIT)
    assert health["model_version"] == v3 and health["mismatch"].startswith(
        f"champion names v{v3}, whose approval does not verify: ")


if __name__ == "__main__":
    build()
