"""The DVC remote from settings (ml/dvc_remote.py) on a local directory remote: DVC itself writes
.dvc/config.local, pushes and pulls; no server involved (tests/integration/test_data_remote.py runs
the same against S3 on loopback, with the training flow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from ml.dvc_remote import (DataRemoteError, RemoteRefused, apply_remote, check_remote, locked_out, pull_lock,
                           push)
from ml.errors import ConfigError
from ml.provenance import dir_md5
from ml.settings import DataRemoteConfig, load_settings
from tests.conftest import REPO

STAGES = {"stages": {"prepare": {"cmd": "true", "outs": ["data/processed"]}}}


def dvc_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    """A DVC repository without git holding one stage whose output has ``files``."""
    from dvc.repo import Repo

    path.mkdir(parents=True)
    Repo.init(str(path), no_scm=True).close()
    (path / "dvc.yaml").write_text(yaml.safe_dump(STAGES))
    for rel, text in (files or {}).items():
        (path / "data/processed" / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / "data/processed" / rel).write_text(text)
    return path


def commit(repo: Path) -> str:
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        dvc.commit(f"{repo}/dvc.yaml:prepare", force=True)
    return (repo / "dvc.lock").read_text()


@pytest.fixture
def trained(tmp_path) -> tuple[Path, str, str]:
    """A repository whose output is committed: its path, dvc.lock and the output's md5."""
    repo = dvc_repo(tmp_path / "a", {"train.parquet": "rows", "schema.json": "{}"})
    lock = commit(repo)
    return repo, lock, dir_md5(repo / "data/processed")


def test_settings_accept_s3_or_a_directory_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.upper().startswith("MLOPS_")]:
        monkeypatch.delenv(name)
    assert load_settings().data_remote == DataRemoteConfig(url=None, name="storage", endpoint_url=None)
    monkeypatch.setenv("MLOPS_DATA_REMOTE__URL", "s3://team-data/dvc")
    monkeypatch.setenv("MLOPS_DATA_REMOTE__ENDPOINT_URL", "http://127.0.0.1:9000")
    remote = load_settings().data_remote
    assert (remote.url, remote.endpoint_url) == ("s3://team-data/dvc", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLOPS_DATA_REMOTE__URL", "../dvc-store")
    assert load_settings().data_remote.url == "../dvc-store"
    for bad in ("gs://bucket/dvc", "s3://", "s3:///prefix"):
        monkeypatch.setenv("MLOPS_DATA_REMOTE__URL", bad)
        with pytest.raises(ConfigError) as err:
            load_settings()
        message = str(err.value)
        assert message.startswith("data_remote.url: expected DVC remote storage: s3://bucket/prefix or a directory")
        assert message.endswith(f"got {bad!r} (from MLOPS_DATA_REMOTE__URL)") and "\n" not in message


def test_the_remote_goes_to_config_local_and_follows_the_settings(tmp_path):
    repo = dvc_repo(tmp_path / "repo")
    committed = (repo / ".dvc/config").read_text()
    url = apply_remote(DataRemoteConfig(url="../store"), repo)
    assert url == str((tmp_path / "store").resolve())
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        local = dvc.config.load_one("local")
    assert local["core"]["remote"] == "storage" and local["remote"]["storage"]["url"] == url
    assert (repo / ".dvc/config").read_text() == committed
    assert "/config.local" in (REPO / ".dvc/.gitignore").read_text().split()  # never committed

    with Repo(str(repo)) as dvc, dvc.config.edit("local") as conf:
        conf["remote"]["storage"]["jobs"] = 2  # an option set by hand is kept
    apply_remote(DataRemoteConfig(url="s3://team-data/dvc", endpoint_url="http://127.0.0.1:9000"), repo)
    with Repo(str(repo)) as dvc:
        remote = dvc.config.load_one("local")["remote"]["storage"]
    assert (remote["url"], remote["endpointurl"], remote["jobs"]) == ("s3://team-data/dvc", "http://127.0.0.1:9000", "2")
    apply_remote(DataRemoteConfig(url="s3://team-data/dvc"), repo)
    with Repo(str(repo)) as dvc:
        assert "endpointurl" not in dvc.config.load_one("local")["remote"]["storage"]


def test_a_clone_pulls_the_locked_output_and_its_md5_matches(trained, tmp_path):
    repo, lock, md5 = trained
    remote = DataRemoteConfig(url=str(tmp_path / "store"))
    assert push(remote, repo) == 3  # two files and the directory listing
    assert push(remote, repo) == 0

    clone = dvc_repo(tmp_path / "b")
    path, stats = pull_lock(remote, lock, md5, clone)
    assert path == "data/processed" and stats["fetched"] == 3
    assert dir_md5(clone / path) == md5 and (clone / "dvc.lock").read_text() == lock
    assert (clone / "data/processed/train.parquet").read_text() == "rows"


def test_a_lock_without_the_versions_output_is_refused(trained, tmp_path):
    _, lock, md5 = trained
    assert locked_out(lock, md5) == "data/processed"
    with pytest.raises(DataRemoteError, match=r"^the dvc.lock records no output with md5 0+\.dir$"):
        locked_out(lock, "0" * 32 + ".dir")


def test_a_failed_pull_leaves_the_checkouts_lock_as_it_was(trained, tmp_path):
    repo, lock, md5 = trained
    empty = DataRemoteConfig(url=str(tmp_path / "empty-store"))
    clone = dvc_repo(tmp_path / "b")
    with pytest.raises(DataRemoteError) as err:
        pull_lock(empty, lock, md5, clone)
    assert str(err.value) == (f"dvc pull from DVC remote storage ({tmp_path / 'empty-store'}) failed: "
                              "data/processed: not there (never pushed?)")
    assert not (clone / "dvc.lock").exists()

    other = dvc_repo(tmp_path / "c", {"train.parquet": "other rows"})
    own = commit(other)
    with pytest.raises(DataRemoteError, match=r"dvc.lock records other outputs than the version's; --force replaces it"):
        pull_lock(empty, lock, md5, other)
    with pytest.raises(DataRemoteError):
        pull_lock(empty, lock, md5, other, force=True)
    assert (other / "dvc.lock").read_text() == own
    assert (other / "data/processed/train.parquet").read_text() == "other rows"


def test_a_directory_remote_that_cannot_be_one_is_refused(tmp_path):
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    remote = DataRemoteConfig(url=str(blocker))
    with pytest.raises(RemoteRefused, match=rf"^DVC remote storage \({blocker}\): {blocker} is a file; expected a directory$"):
        check_remote(remote)
    check_remote(DataRemoteConfig(url=str(tmp_path / "new" / "store")))  # DVC makes missing directories


def test_a_push_to_a_file_is_refused_not_retried(trained, tmp_path):
    from prefect.states import Failed

    from tasks.entry import should_retry

    repo, _, _ = trained
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    with pytest.raises(RemoteRefused) as err:
        push(DataRemoteConfig(url=str(blocker)), repo)
    assert str(err.value) == f"dvc push refused: DVC remote storage ({blocker}): {blocker} is a file; expected a directory"
    assert should_retry(None, None, Failed(data=err.value)) is False
    assert should_retry(None, None, Failed(data=DataRemoteError("dvc push failed: timeout"))) is True


def test_an_endpoint_that_does_not_answer_may_answer_a_retry(monkeypatch):
    import socket

    from tasks.entry import should_retry
    from prefect.states import Failed

    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DataRemoteError) as err:
        check_remote(DataRemoteConfig(url="s3://team-data/dvc", endpoint_url=endpoint))
    assert not isinstance(err.value, RemoteRefused)
    assert str(err.value) == f"DVC remote storage bucket team-data: cannot reach the S3 endpoint {endpoint}"
    assert should_retry(None, None, Failed(data=err.value)) is True
