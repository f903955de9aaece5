"""A release published by promotion is mirrored to S3 (moto's server on loopback, through boto3) when
the checkpoint mirror is set, and a machine without the local copy gets the same weights from it."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import pytest

from tests.unit.test_releases import MODEL, registry  # noqa: F401 - fixtures

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_promotion_mirrors_the_release_and_it_restores_from_s3(registry, s3_endpoint, monkeypatch):  # noqa: F811
    import boto3

    from ml.checkpoint.manager import CheckpointManager
    from ml.checkpoint.s3 import S3Mirror
    from registry import actions
    from registry.releases import RELEASE_WEIGHTS_TAG, weights_sha256

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    bucket = f"rel-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    uri, client, local = registry
    checkpoint = local.model_copy(update={"s3_bucket": bucket, "s3_prefix": "team/releases",
                                          "s3_endpoint_url": s3_endpoint})
    record = actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    assert record.tags["release_location"].endswith(f" s3://{bucket}/team/releases/production/1.0.0")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="team/releases/production/1.0.0/")["Contents"]}
    assert {f"team/releases/production/1.0.0/{f}" for f in ("model.safetensors", "config.json", "model_card.json",
                                                            "manifest.json")} <= keys

    shutil.rmtree(Path(checkpoint.dir))  # another machine: no local copy
    mirror = S3Mirror(bucket, "team/releases", endpoint_url=s3_endpoint)
    with CheckpointManager(checkpoint.dir, mirror=mirror) as manager:
        released = manager.load_production("1.0.0")
    assert weights_sha256(released.weights) == record.tags[RELEASE_WEIGHTS_TAG]
    assert released.model_card["source"]["model_version"] == "1"

    # the mirror's latest names the live release: the newest, then v1's again once it is re-promoted
    actions.promote_version(uri, MODEL, "2", checkpoint=checkpoint)
    assert mirror.read_pointer("production", "latest") == {"name": "1.1.0"}
    shutil.rmtree(Path(checkpoint.dir))  # the release that is live again is on S3 alone
    actions.promote_version(uri, MODEL, "1", checkpoint=checkpoint)
    assert mirror.read_pointer("production", "latest") == {"name": "1.0.0"}
