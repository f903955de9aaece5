"""Two `prefect deployment run`s of the training pipeline started together, picked up by a process work
pool with two workers: each works in its own git worktree (flows/workspace.py), both register, neither
sees the other's outputs, and the checkout is left as it was."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mlops import services
from tests.conftest import copy_repo, shrink_params

pytestmark = pytest.mark.slow


def files_and_mtimes(project: Path) -> dict[str, int]:
    return {str(p.relative_to(project)): p.stat().st_mtime_ns for p in project.rglob("*")
            if p.is_file() and ".git" not in p.relative_to(project).parts[:1]}


def test_two_deployment_runs_at_once_each_in_its_own_workspace(tmp_path):
    project = copy_repo(tmp_path / "repo")
    shrink_params(project)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "short training"],
                   cwd=project, check=True)
    root = tmp_path / "workspaces"
    before = files_and_mtimes(project)
    port = services.free_port()
    env = services.prefect_env(port, home=tmp_path / "prefect-home")
    server = services.start_prefect(port, home=tmp_path / "prefect-home", log=tmp_path / "server.log")
    workers = []
    try:
        services.deploy_flows(project, env)
        worker_env = {**env, "PYTHONPATH": str(project), "MLOPS_WORKSPACE__ROOT": str(root)}
        workers = [services.start_worker(project, worker_env, log=tmp_path / f"worker{i}.log", limit=1)
                   for i in range(2)]
        runs = [subprocess.Popen([str(services.BIN / "prefect"), "deployment", "run", "training-pipeline/local",
                                  "--watch", "--watch-timeout", "560"],
                                 env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
        outputs = [run.communicate(timeout=600)[0] for run in runs]
        logs = "".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2))
        for run, output in zip(runs, outputs):
            assert run.returncode == 0, output[-2000:] + logs
            assert "Completed" in output
    finally:
        for worker in workers:
            services.stop(worker)
        services.stop(server)

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db", registry_uri=f"sqlite:///{project}/mlflow.db")
    versions = {str(v.version): v for v in client.search_model_versions("name = 'digits-classifier'")}
    assert sorted(versions) == ["1", "2"]
    pipelines = client.search_runs([client.get_experiment_by_name("mlops-pipeline").experiment_id],
                                   "tags.`mlops.run_kind` = 'pipeline'")
    assert len(pipelines) == 2
    # the two flow runs ran side by side, on the two workers
    (a, b) = (p.info for p in pipelines)
    assert a.start_time < b.end_time and b.start_time < a.end_time
    workspaces = {p.data.tags["workspace"] for p in pipelines}
    assert len(workspaces) == 2 and all(Path(w).parent == root for w in workspaces)
    train_run_files = set()
    for pipeline in pipelines:
        tags = pipeline.data.tags
        assert tags["workspace_checkout"] == str(project) and tags["git_dirty"] == "False"
        children = {c.data.tags.get("stage"): c for c in client.search_runs(
            [pipeline.info.experiment_id], f"tags.mlflow.parentRunId = '{pipeline.info.run_id}'")}
        assert set(children) >= {"prepare", "validate", "train", "evaluate", "register"}
        # each stage read what its own run's stages wrote: the model trained under this pipeline run
        assert children["train"].info.run_id == tags["train_run_id"]
        assert children["evaluate"].data.tags["evaluated_run_id"] == tags["train_run_id"]
        assert children["register"].data.tags["source_run_id"] == tags["train_run_id"]
        assert versions[tags["registered_version"]].run_id == tags["train_run_id"]
        lock = yaml.safe_load(Path(client.download_artifacts(pipeline.info.run_id, "dvc/dvc.lock", str(
            tmp_path / pipeline.info.run_id))).read_text())
        train_run_files.add(next(o["md5"] for o in lock["stages"]["train"]["outs"]
                                 if o["path"] == "reports/train_run.json"))
    assert len(train_run_files) == 2  # each lock records its own train run's file
    assert {versions["1"].run_id, versions["2"].run_id} == {p.data.tags["train_run_id"] for p in pipelines}

    # both workspaces removed; the checkout never written: its files as they were, no outputs in it
    assert not any(Path(w).exists() for w in workspaces)
    # train.optimize auto's choice outlives the workspaces, for the next deployment run to reuse
    assert (root / "autotune.json").is_file()
    worktrees = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=project, capture_output=True,
                               text=True, check=True).stdout
    assert worktrees.count("worktree ") == 1
    assert subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True,
                          check=True).stdout == ""
    for out in ("data/processed", "data/raw", "models", "reports", "checkpoints", "dvc.lock"):
        assert not (project / out).exists(), out
    after = files_and_mtimes(project)
    assert {k: v for k, v in after.items() if k in before} == before
    # new files: the MLflow store and artifacts, and the shared DVC cache the flows committed to
    new = {k.split("/")[0] if not k.startswith(".dvc/") else "/".join(k.split("/")[:2]) for k in after} - {
        k.split("/")[0] if not k.startswith(".dvc/") else "/".join(k.split("/")[:2]) for k in before}
    assert new <= {"mlflow.db", "mlartifacts", ".dvc/cache", ".dvc/tmp", ".mlflow-spool"}, new
    assert any((project / ".dvc" / "cache").rglob("*.dir"))
