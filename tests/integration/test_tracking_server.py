"""The tracker against a real ``mlflow server`` on loopback: every captured field of a train run,
an outage in the middle of a run, and SIGTERM with the store up and down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ml.settings import TrackingConfig
from tests.conftest import REPO, run_module, small_params, write_params, write_settings
from tests.integration.test_metric_buffer_server import server, wait_until  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def tracking_cfg(url: str, spool: Path, **overrides) -> TrackingConfig:
    values = dict(uri=url, experiment="tracker", artifact_root=str(spool.parent / "artifacts"),
                  flush_interval_s=0.1, spool_dir=str(spool), system_metrics_interval_s=0.2,
                  histogram_every_steps=None, confusion_every_epoch=False, progress="off")
    values.update(overrides)
    return TrackingConfig(**values)


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=project, check=True,
                   capture_output=True)


def test_a_train_run_records_every_captured_field(server, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project = tmp_path / "project"
    project.mkdir()
    tracking = {"uri": server.url, "histogram_every_steps": 5, "system_metrics_interval_s": 0.2,
                "confusion_every_epoch": True}
    write_params(project, small_params())
    write_settings(project, tracking=tracking)
    git(project, "init", "-q")
    git(project, "add", "params.yaml")
    git(project, "commit", "-qm", "params")
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "# a local edit\n")  # dirty

    for stage in ("prepare", "train"):
        done = run_module(f"tasks.{stage}", cwd=project)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "View run" not in done.stdout and "View experiment" not in done.stdout  # MLflow's own URL lines

    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name("mlops-pipeline")
    (run,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    tags, run_id = run.data.tags, run.info.run_id
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    expected_tags = {"host", "os_user", "mlflow.user", "cpu_model", "cpu_cores_logical", "memory_total_gb",
                     "gpu_count", "python", "torch", "cuda", "cudnn", "command", "git_commit", "git_branch",
                     "git_dirty", "dataset_md5", "dataset_source", "mlflow", "platform"}
    assert expected_tags <= set(tags), expected_tags - set(tags)
    assert tags["git_commit"] == commit and tags["git_dirty"] == "True"
    assert tags["gpu_count"] == "0" and "gpu_absent_reason" in tags  # no NVML here: said why
    assert run.info.run_name.startswith("train-lr0.003-bs64-")
    assert run.data.params["train.lr"] == "0.003" and run.data.params["settings.checkpoint.keep_last"] == "2"
    assert tags["tracking.metrics_in_spool"] == "0" and int(tags["tracking.metrics_sent"]) > 0

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == tags["dataset_md5"]
    assert {t.key: t.value for t in dataset_input.tags}["raw_source"] == "sklearn:digits"

    metrics = run.data.metrics
    for key in ("train/loss", "train/step_ms", "train/samples_per_s", "train/data_wait_ms", "train/grad_norm",
                "val_accuracy", "system/cpu_percent", "system/process_rss_mb", "system/peak/process_rss_mb",
                "timing/mean_step_ms", "checkpoint/training_blocking_ms", "checkpoint/training_bytes"):
        assert key in metrics, key
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, len(steps) + 1)) and len(steps) == 3 * 20  # 3 epochs of 20 batches

    artifacts = tmp_path / "artifacts-out"
    client.download_artifacts(run_id, "", str(artifacts))
    assert "a local edit" in (artifacts / "git" / "diff.patch").read_text()
    assert "starting fresh" in (artifacts / "console" / "train.log").read_text()
    assert "## Recommendations" in (artifacts / "summary.md").read_text()
    assert sorted(p.name for p in (artifacts / "confusion").iterdir()) == [
        f"epoch-000{e}.{ext}" for e in (1, 2, 3) for ext in ("json", "png")]
    events = EventAccumulator(str(artifacts / "histograms"), size_guidance={"histograms": 0})
    events.Reload()
    weight_tag = "weights/net.0.weight"
    assert weight_tag in events.Tags()["histograms"] and "gradients/net.0.weight" in events.Tags()["histograms"]
    assert [e.step for e in events.Histograms(weight_tag)] == list(range(5, 61, 5))
    assert (artifacts / "histograms" / "histograms.parquet").is_file()


def test_every_metric_lands_across_an_outage_through_the_tracker(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    from mlflow import MlflowClient

    from ml.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker.start(tracking_cfg(server.url, tmp_path / "spool"), "outage", system_metrics=False)

    def log(steps):
        for step in steps:
            tracker.log_metric("loss", 1.0 / (step + 1), step)
            tracker.log_metrics({"acc": step / 1000.0}, step)

    log(range(0, 200))
    wait_until(lambda: tracker.buffer.counters().sent == 400, timeout=30, what="the first points to be sent")
    server.stop()
    log(range(200, 400))
    wait_until(lambda: tracker.buffer.counters().spooled >= 400, timeout=30, what="the outage's points to spool")
    server.start()
    log(range(400, 600))
    counters = tracker.close()

    assert counters.spool_backlog == 0 and counters.dropped == 0 and counters.replayed >= 400
    client = MlflowClient(tracking_uri=server.url)
    for key, expected in (("loss", lambda s: 1.0 / (s + 1)), ("acc", lambda s: s / 1000.0)):
        history = client.get_metric_history(tracker.run_id, key)
        assert sorted(m.step for m in history) == list(range(600))
        assert all(m.value == pytest.approx(expected(m.step)) for m in history)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["tracking.metrics_replayed"]) >= 400


CHILD = textwrap.dedent("""
    import sys, time
    from ml.settings import TrackingConfig
    from ml.tracking.mlflow_tracker import MlflowTracker

    url, spool, ready = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = TrackingConfig(uri=url, experiment="sigterm", artifact_root=spool + "-artifacts", flush_interval_s=3600,
                         spool_dir=spool, system_metrics_interval_s=3600, histogram_every_steps=None,
                         confusion_every_epoch=False, progress="off")
    tracker = MlflowTracker.start(cfg, "sigterm", system_metrics=False)
    print(tracker.run_id, flush=True)
    open(ready, "w").close()
    input()  # the parent may stop the store before the points are logged
    for step in range(3000):
        tracker.log_metric("loss", step * 0.25, step)
    print("logged", flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("store_up", [True, False], ids=["store-up", "store-down"])
def test_sigterm_mid_run_loses_nothing(server, tmp_path, store_up):
    from mlflow import MlflowClient

    from ml.tracking.mlflow_tracker import MlflowTracker

    spool = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, server.url, str(spool), str(tmp_path / "ready")],
                             cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        run_id = child.stdout.readline().strip()
        if not store_up:
            server.stop()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "logged"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()

    if not store_up:
        assert len((spool / f"{run_id}.metrics.jsonl").read_text().splitlines()) == 3000
        server.start()
        # the next run against this store and spool replays what the killed one left, as it starts
        following = MlflowTracker.start(tracking_cfg(server.url, spool, experiment="sigterm"), "next",
                                        system_metrics=False)
        assert not (spool / f"{run_id}.metrics.jsonl").exists()
        following.close()
    client = MlflowClient(tracking_uri=server.url)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(3000))
    assert all(m.value == m.step * 0.25 for m in history)

