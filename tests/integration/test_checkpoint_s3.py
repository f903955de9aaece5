"""The S3 mirror against moto's S3 server on loopback, through boto3: same commit rules remotely
(data first, manifest last), retention and pointers mirrored, restore when the local copy is
missing, corruption and interrupted uploads refused, upload errors surfacing."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from ml.checkpoint.manager import CheckpointCorrupt, CheckpointManager
from ml.checkpoint.s3 import CheckpointMirrorError, S3Mirror
from ml.train.checkpoints import CheckpointHook, resume as resume_from_checkpoints
from ml.train.loop import Callback, fit, seed_everything
from ml.model.architectures import MLP, ModelSpec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket and a boto3 client on the server (retries off, so injected failures are final)."""
    import boto3
    from botocore.config import Config

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint, config=Config(retries={"max_attempts": 1}))
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket, s3_endpoint


def small_state(step: int) -> dict:
    return {"model": {"w": torch.full((64, 32), float(step))}, "loop": {"step": step}}


def remote_keys(client, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", ())}


class Interrupted(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, manager: CheckpointManager, step: int | None) -> None:
        self.manager, self.step = manager, step

    def on_step_end(self, state, loss: float) -> None:
        if state.global_step == self.step:
            self.manager.wait()
            raise Interrupted


def train(manager: CheckpointManager | None = None, crash_step: int | None = None, resume: bool = False):
    """3 epochs of 5 batches; checkpoints every 3 steps and at each epoch end."""
    generator = seed_everything(0)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(70, 6, generator=data), torch.randint(0, 3, (70,), generator=data)
    model = MLP(ModelSpec(6, (16,), 3, 0.3))
    model.set_input_stats(x.numpy())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    hooks, state, resumed_from = [], None, None
    if manager is not None:
        if resume:
            result = resume_from_checkpoints(manager, model, optimizer, generator=generator)
            state, resumed_from = result.state, result.name
        hooks = [CheckpointHook(manager, model, optimizer, generator=generator, every_steps=3),
                 CrashAt(manager, crash_step)]
    try:
        fit(model, optimizer, (x, y), (x[:20], y[:20]), epochs=3, batch_size=16, generator=generator,
            hooks=hooks, state=state)
    except Interrupted:
        pass
    finally:
        if manager is not None:
            manager.close()
    return model.state_dict(), resumed_from


def test_mirror_then_delete_the_local_root_and_resume_from_s3_bit_identically(s3, tmp_path):
    client, bucket, endpoint = s3
    expected, _ = train()
    root = tmp_path / "ckpt"
    mirror = lambda: S3Mirror(bucket, "runs/a", endpoint_url=endpoint)  # noqa: E731 (credentials from the env)
    train(CheckpointManager(root, compress="zstd", mirror=mirror()), crash_step=9)
    local = CheckpointManager(root, read_only=True).list("training")
    assert local == ["epoch-0001-step-00000006", "epoch-0001-step-00000009"]
    assert {p.name for p in (root / "training" / local[-1]).iterdir()} >= {"model.safetensors.zst", "manifest.json"}
    shutil.rmtree(root)

    assert [n for n, _ in mirror().list("training")[0]] == local  # retention applied remotely too
    got, resumed_from = train(CheckpointManager(root, compress="zstd", mirror=mirror()), resume=True)
    assert resumed_from == "epoch-0001-step-00000009"  # mid-epoch 2
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_remote_layout_pointers_and_retention_follow_the_local_tiers(s3, tmp_path):
    client, bucket, endpoint = s3
    mirror = S3Mirror(bucket, "p", client=client)
    with CheckpointManager(tmp_path, keep_last=2, mirror=mirror) as mgr:
        for step in (1, 2, 3):
            mgr.save_training_checkpoint(small_state(step), step).result()
        mgr.save_milestone_checkpoint(small_state(3), "val_loss", 0.5, "min", epoch=1, step=3)
        mgr.save_production_checkpoint({"w": torch.ones(3)}, "1.0.0", {"a": 1}, {"b": 2})
        assert mgr.list_remote("training") == mgr.list("training") == ["step-00000002", "step-00000003"]
    keys = remote_keys(client, bucket, "p/")
    assert "p/training/step-00000001/manifest.json" not in keys
    assert {"p/training/step-00000003/manifest.json", "p/training/step-00000003/model.safetensors",
            "p/training/step-00000003/state.json", "p/training/latest", "p/milestone/best_val_loss",
            "p/production/1.0.0/model.safetensors", "p/production/latest"} <= keys
    assert not any(k.startswith("p/training/step-00000001/") for k in keys)
    assert mirror.read_pointer("training", "latest") == {"name": "step-00000003"}
    assert mirror.read_pointer("milestone", "best_val_loss")["name"] == "val_loss-epoch-0001-step-00000003"

    shutil.rmtree(tmp_path / "production")
    with CheckpointManager(tmp_path, mirror=mirror) as mgr:
        assert torch.equal(mgr.load_production("1.0.0").weights["w"], torch.ones(3))  # missing locally: restored
        assert mgr.list("production") == ["1.0.0"]


def test_a_corrupted_remote_object_is_refused_and_resume_falls_back(s3, tmp_path):
    client, bucket, _ = s3
    mirror = S3Mirror(bucket, "", client=client)
    with CheckpointManager(tmp_path / "a", keep_last=3, mirror=mirror, checksum="sha256") as mgr:
        for step in (1, 2):
            mgr.save_training_checkpoint(small_state(step), step).result()
    key = "training/step-00000002/model.safetensors"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    with CheckpointManager(tmp_path / "b", mirror=mirror) as mgr:  # an empty local root
        loaded = mgr.load_latest_valid()
        assert loaded.name == "step-00000001" and loaded.state["loop"]["step"] == 1
        assert loaded.skipped[0][0] == "step-00000002"
        assert f"s3://{bucket}/{key}: SHA-256 differs" in loaded.skipped[0][1]
        assert mgr.list("training") == ["step-00000001"]  # the corrupt one was never installed
        assert not any(p.name.startswith(".") for p in mgr.tier_dir("training").iterdir() if p.is_dir())
        with pytest.raises(CheckpointCorrupt, match="SHA-256 differs"):
            mgr.load_checkpoint("training", "step-00000002")

    client.delete_object(Bucket=bucket, Key="training/step-00000001/state.json")
    with CheckpointManager(tmp_path / "c", mirror=mirror) as mgr:
        with pytest.raises(CheckpointCorrupt, match="no valid checkpoint.*state.json: missing"):
            mgr.load_latest_valid()


def test_an_upload_interrupted_before_the_manifest_is_never_listed(s3, tmp_path):
    from botocore.exceptions import ConnectionClosedError

    client, bucket, _ = s3
    mirror = S3Mirror(bucket, "run", client=client)
    mgr = CheckpointManager(tmp_path / "a", mirror=mirror)
    mgr.save_training_checkpoint(small_state(1), 1).result()

    def drop_manifest_upload(request, **kwargs):
        if request.url.endswith("/manifest.json"):
            raise ConnectionClosedError(endpoint_url=request.url)

    client.meta.events.register("before-send.s3.PutObject", drop_manifest_upload)
    mgr.save_training_checkpoint(small_state(2), 2)  # the upload fails in the background
    with pytest.raises(CheckpointMirrorError, match=r"s3://.*/run/training/step-00000002/manifest.json: upload failed"):
        mgr.save_training_checkpoint(small_state(3), 3)
    client.meta.events.unregister("before-send.s3.PutObject", drop_manifest_upload)
    mgr.close()
    assert mgr.list("training") == ["step-00000001", "step-00000002"]  # the local commit stands

    keys = remote_keys(client, bucket, "run/training/step-00000002/")
    assert "run/training/step-00000002/model.safetensors" in keys and not any(k.endswith("manifest.json") for k in keys)
    committed, rejected = mirror.list("training")
    assert [n for n, _ in committed] == ["step-00000001"]
    assert rejected == [("step-00000002", f"s3://{bucket}/run/training/step-00000002/manifest.json: missing "
                                          "(upload never committed)")]
    with CheckpointManager(tmp_path / "b", mirror=mirror) as fresh:
        loaded = fresh.load_latest_valid()
        assert loaded.name == "step-00000001" and loaded.skipped == []


def test_upload_errors_surface_at_close_and_keep_the_local_commit(s3, tmp_path):
    _, _, endpoint = s3
    mgr = CheckpointManager(tmp_path, mirror=S3Mirror("no-such-bucket", "x", endpoint_url=endpoint))
    mgr.save_training_checkpoint(small_state(1), 1)
    with pytest.raises(CheckpointMirrorError, match=r"s3://no-such-bucket/x/training/step-00000001/.*NoSuchBucket"):
        mgr.close()
    assert CheckpointManager(tmp_path, read_only=True).list("training") == ["step-00000001"]


def test_restore_needs_a_reachable_mirror_rather_than_starting_fresh(tmp_path):
    mirror = S3Mirror("bucket", "x", endpoint_url="http://127.0.0.1:9")  # nothing listens on the discard port
    import boto3
    from botocore.config import Config

    mirror._client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", aws_access_key_id="k",
                                  aws_secret_access_key="s", region_name="us-east-1",
                                  config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with CheckpointManager(tmp_path, mirror=mirror) as mgr:
        with pytest.raises(CheckpointMirrorError, match="s3://bucket/x/training/: listing failed"):
            mgr.load_latest_valid()


def test_a_bucket_name_with_a_slash_is_refused():
    with pytest.raises(ValueError, match="bucket"):
        S3Mirror("a/b")


def test_nothing_is_imported_or_connected_at_construction():
    """In a fresh interpreter (this one has imported boto3 for the other tests): making a mirror
    and a manager with it imports neither boto3 nor botocore, and connects nowhere (nothing
    listens on the discard port)."""
    code = """
import sys, tempfile
from ml.checkpoint.manager import CheckpointManager
from ml.checkpoint.s3 import S3Mirror
mirror = S3Mirror("bucket", "/a/b/", endpoint_url="http://127.0.0.1:9")
with tempfile.TemporaryDirectory() as root:
    CheckpointManager(root, mirror=mirror).close()
assert mirror._client is None
print(mirror.url("training", "n", "f"), mirror.key("milestone", "best_x"))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "s3transfer")))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["s3://bucket/a/b/training/n/f a/b/milestone/best_x", "[]"]
