"""``mlops serve`` as a real process on loopback: predictions, input checks, body limit, health and
info, following the champion through a promotion and a rollback, and the deployment records."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from mlops import services
from deploy.records import read_records
from tests.conftest import PYTHON, REPO, run_module, small_params, write_params, write_settings
from tests.integration.serving_setup import LoopingClients

pytestmark = pytest.mark.slow

ENDPOINT = "digits-test"
MAX_BODY = 262_144


@dataclass(frozen=True)
class Project:
    path: Path
    tracking_uri: str
    model_name: str
    versions: list[str]
    test_accuracy: dict[str, float]

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """Two approved versions of a small model; the first is champion."""
    path = tmp_path_factory.mktemp("serving")
    write_params(path, small_params())
    write_settings(path, tracking={"uri": f"sqlite:///{path / 'mlflow.db'}"},
                   serve={"endpoint": ENDPOINT, "poll_interval_s": 0.5, "max_body_bytes": MAX_BODY})
    done = run_module("tests.integration.serving_setup", cwd=path)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return Project(path, info["tracking_uri"], info["model_name"], info["versions"], info["test_accuracy"])


def serve_env() -> dict[str, str]:
    """The test's environment minus an outside MLFLOW_TRACKING_URI: the project's params name the store."""
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def server_process(project):
    """``mlops serve`` on a free loopback port, run from the project directory (still starting)."""
    port = services.free_port()
    with open(project.path / "serve.log", "ab") as log:
        proc = subprocess.Popen([PYTHON, "-m", "mlops.cli", "serve", "--port", str(port)], cwd=project.path,
                                env=serve_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    yield f"http://127.0.0.1:{port}", proc
    services.stop(proc)


@pytest.fixture(scope="module")
def endpoint(server_process, reference):
    """The server once it answers /health (the reference predictions are computed meanwhile)."""
    url, proc = server_process
    services.wait_http(f"{url}/health", timeout=120, proc=proc)
    return url, proc


@pytest.fixture(scope="module")
def digits_test(project) -> tuple[np.ndarray, np.ndarray]:
    from ml.data.prepare import load_split

    return load_split(project.path / "data/processed", "test")


@pytest.fixture(scope="module")
def reference(project, digits_test):
    """Each version's own class probabilities on the test rows, from the logged model itself."""
    import mlflow.pytorch
    import torch

    out = {}
    for version in project.versions:
        module = mlflow.pytorch.load_model(project.client().get_model_version_download_uri(project.model_name, version))
        with torch.no_grad():
            out[version] = torch.softmax(module(torch.from_numpy(digits_test[0])), dim=1).numpy()
    return out


def post(url: str, payload, **kwargs) -> httpx.Response:
    content = json.dumps(payload) if isinstance(payload, (dict, list)) else payload
    return httpx.post(f"{url}/predict", content=content, headers={"Content-Type": "application/json"},
                      timeout=30, **kwargs)


def test_refuses_a_missing_model_or_alias_in_one_line(project):
    runs = [subprocess.Popen([PYTHON, "-m", "mlops.cli", "serve", *extra, "--port", "0"], cwd=project.path,
                             env=serve_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in (["--name", "no-such-model"], ["--alias", "staging"])]
    (_, missing_model), (_, missing_alias) = (p.communicate(timeout=120) for p in runs)
    assert all(p.returncode == 2 for p in runs)
    assert missing_model.strip().splitlines()[-1] == (
        f"error: model 'no-such-model': not found in the registry at {project.tracking_uri}")
    assert missing_alias.strip().splitlines()[-1].startswith(
        f"error: model '{project.model_name}' has no alias 'staging';")
    assert "Traceback" not in missing_model + missing_alias


def test_predictions_equal_the_models_own(endpoint, project, digits_test, reference):
    url, _ = endpoint
    x, y = digits_test
    response = post(url, {"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    version = body["model_version"]
    expected = reference[version]
    assert body["predictions"] == expected.argmax(axis=1).tolist()
    assert body["labels"] == [str(i) for i in body["predictions"]]  # digits: class i is named "i"
    np.testing.assert_allclose(np.array(body["probabilities"]), expected, atol=1e-5)
    accuracy = float(np.mean(np.array(body["predictions"]) == y))
    assert accuracy == pytest.approx(project.test_accuracy[version], abs=1e-9)


@pytest.mark.parametrize("payload", [
    {"instances": "ROWS"},
    {"dataframe_split": {"columns": [f"pixel_{i}" for i in range(64)], "data": "ROWS"}},
    {"dataframe_split": {"data": "ROWS"}},
])
def test_mlflow_scoring_formats_give_the_same_answer(endpoint, digits_test, reference, payload):
    url, _ = endpoint
    rows = digits_test[0][:5].tolist()
    encoded = json.dumps(payload).replace('"ROWS"', json.dumps(rows))
    response = post(url, encoded)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == reference[response.json()["model_version"]][:5].argmax(axis=1).tolist()


ROW = [0.0] * 64


@pytest.mark.parametrize("body, fragment", [
    ({"inputs": [[1.0, 2.0, 3.0]]},
     "inputs: expected rows of 64 numbers in column order pixel_0..pixel_63, got a row of 3"),  # the contract's
    ({"inputs": ROW}, "inputs: expected a list of rows (a 2-D array), each a list of 64 numbers"),
    ({"inputs": []}, "inputs: expected a non-empty list of rows of 64 numbers"),
    ({"inputs": [["a"] * 64]}, "inputs: expected numbers, got str"),
    ({"inputs": [[None] * 64]}, "inputs: expected numbers, got null"),
    ({"inputs": [[True] * 64]}, "inputs: expected numbers, got bool"),
    ({"inputs": [[1e39] * 64]}, "inputs: expected finite numbers within float32 range"),
    ({"data": [ROW]}, "expected a JSON object with exactly one of the keys inputs, instances, dataframe_split, "
                      "dataframe_records; got 'data'"),
    ([ROW], "expected a JSON object with exactly one of the keys"),
    ({"dataframe_split": {"columns": ["a"], "data": [ROW]}},
     "dataframe_split: unknown column 'a'; columns 'pixel_0', 'pixel_1'"),  # the data contract's feature names
    ({"dataframe_records": [{"a": 1}]}, "dataframe_records: unknown column 'a'; columns 'pixel_0'"),
    (b'{"inputs": [[1, 2', "body is not valid JSON"),
    (b"", "body is not valid JSON"),
])
def test_malformed_input_is_422_with_one_line(endpoint, body, fragment):
    url, _ = endpoint
    response = post(url, body)
    assert response.status_code == 422
    message = response.json()["error"]
    assert fragment in message and "\n" not in message


def test_bodies_over_the_limit_are_413(endpoint):
    url, _ = endpoint
    oversized = b'{"inputs": [[' + b"0," * (MAX_BODY // 2) + b"0]]}"
    declared = post(url, oversized)
    assert declared.status_code == 413
    assert declared.json()["error"] == f"request body exceeds serve.max_body_bytes = {MAX_BODY} bytes"

    def chunks():  # no Content-Length: the limit holds while the body is read
        yield b'{"inputs": [['
        for _ in range(MAX_BODY // 4096 + 1):
            yield b"0," * 2048
        yield b"0]]}"

    streamed = post(url, chunks())
    assert streamed.status_code == 413
    assert httpx.get(f"{url}/health").status_code == 200


def test_health_and_info_describe_the_served_version(endpoint, project):
    url, _ = endpoint
    info = httpx.get(f"{url}/info").json()
    version = info["model_version"]
    assert httpx.get(f"{url}/health").json() == {"status": "ready", "model_version": version}
    record = project.client().get_model_version(project.model_name, version)
    assert info["endpoint"] == ENDPOINT and info["url"] == url
    assert info["model_name"] == project.model_name and info["alias"] == "champion"
    assert info["model_uri"] == f"models:/{project.model_name}/{version}"
    assert info["run_id"] == record.run_id and info["approval_status"] == "Approved"
    assert info["dataset_md5"] == record.tags["dataset_md5"] and info["dataset_md5"].endswith(".dir")
    assert info["dataset_source"] == record.tags["dataset_source"] == "sklearn:digits"
    assert info["serving_since"].endswith("+00:00")
    assert info["tracking_uri"] == project.tracking_uri
    assert info["input"] == {"width": 64, "dtype": "float32", "columns": [f"pixel_{i}" for i in range(64)]}
    assert info["classes"] == [str(i) for i in range(10)]
    tag = json.loads(record.tags[f"deployment.{ENDPOINT}"])
    assert tag["url"] == url and tag["since"] == info["serving_since"] and tag["until"] is None


@pytest.fixture(scope="module")
def moves() -> list[str]:
    """The versions the champion alias was moved to while the module's server ran, in order."""
    return []


def test_follows_promotion_and_rollback_without_a_failed_request(endpoint, project, digits_test, reference, moves):
    from registry import store

    url, _ = endpoint
    first, second = project.versions
    rows = digits_test[0][:40]
    assert httpx.get(f"{url}/info").json()["model_version"] == first
    payloads = [json.dumps({"inputs": [row.tolist()]}).encode() for row in rows]
    with LoopingClients(url, payloads, clients=4) as clients:
        marks = [clients.wait_until_each(lambda a: a.model_version == first, [0] * 4, 60, f"v{first} answer")]
        for version in (second, first):
            since = clients.counts()
            if version == second:
                store.promote(project.client(), project.model_name, second, "tester")
            else:
                store.rollback(project.client(), project.model_name, "tester")
            moves.append(version)
            marks.append(clients.wait_until_each(lambda a, v=version: a.model_version == v, since, 60,
                                                 f"a v{version} answer after the move"))
        assert clients.dead() == [], "a client thread died while the champion moved"
        clients.stop()
        marks.append(clients.counts())
    answers = [a for client in clients.answers for a in client]
    assert [(a.status, a.body) for a in answers if a.status != 200] == []
    for k in range(len(clients.answers)):  # every client kept being answered across every move
        assert all(before[k] < after[k] for before, after in zip(marks, marks[1:])), marks
    for answer in answers:  # each answer comes whole from the version it names
        body = json.loads(answer.body)
        np.testing.assert_allclose(body["probabilities"][0], reference[body["model_version"]][answer.payload],
                                   atol=1e-5)
    for client in clients.answers:  # no client saw the versions flip back and forth
        versions = [a.model_version for a in client]
        switches = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
        assert switches == [first, second, first]
    info = httpx.get(f"{url}/info").json()
    assert info["model_version"] == first and info["alias_target"] == first


def test_clean_shutdown_records_start_switches_and_stop(endpoint, project, moves):
    url, proc = endpoint
    pid = proc.pid
    services.stop(proc)
    records = read_records(project.path / "deployments", ENDPOINT)
    first = project.versions[0]
    served_last = moves[-1] if moves else first
    assert [(r.event, r.model_version) for r in records] == [
        ("start", first), *(("switch", v) for v in moves), ("stop", served_last)]
    ready = f"{ENDPOINT}: serving {project.model_name} v{records[0].model_version} (@champion) at {url}"
    assert ready in (project.path / "serve.log").read_text().splitlines()
    assert {r.pid for r in records} == {pid} and {r.url for r in records} == {url}
    assert records[-1].model_version == records[-2].model_version
    assert all(r.tracking_uri == project.tracking_uri and r.model_name == project.model_name for r in records)
    for record in records:
        mv = project.client().get_model_version(project.model_name, record.model_version)
        assert record.run_id == mv.run_id and record.model_uri == f"models:/{project.model_name}/{mv.version}"
    tag = json.loads(project.client().get_model_version(project.model_name, records[-1].model_version)
                     .tags[f"deployment.{ENDPOINT}"])
    assert tag["until"] is not None and tag["url"] == url
