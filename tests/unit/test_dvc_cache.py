"""A directory DVC tracked comes back out of the local cache by its md5, through DVC's own object
database; anything short of all of its files is None with the reason."""

import pytest

from ml.data.dvc_cache import cached_files, materialize


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """A DVC repository whose cache holds ``processed/`` (two files, one in a subdirectory); its md5."""
    from dvc.repo import Repo

    from ml.provenance import dir_md5

    monkeypatch.chdir(tmp_path)
    Repo.init(no_scm=True).close()
    data = tmp_path / "processed"
    (data / "sub").mkdir(parents=True)
    (data / "train.parquet").write_text("train")
    (data / "sub" / "schema.json").write_text("{}")
    md5 = dir_md5(data)
    with Repo(".") as repo:
        repo.add("processed")
    return tmp_path, md5


def test_every_file_of_the_directory_by_its_relative_path(tracked):
    root, md5 = tracked
    files, why = cached_files(md5)
    assert why == "" and sorted(files) == ["sub/schema.json", "train.parquet"]
    assert files["train.parquet"].read_text() == "train" and root / ".dvc" / "cache" in files["train.parquet"].parents
    done, why = materialize(md5, root / "out")
    assert done and why == "" and (root / "out" / "sub" / "schema.json").read_text() == "{}"


def test_a_file_missing_from_the_cache_is_none_with_its_name(tracked):
    root, md5 = tracked
    files, _ = cached_files(md5)
    files["train.parquet"].chmod(0o644)
    files["train.parquet"].unlink()
    assert cached_files(md5) == (None, f"{md5}: train.parquet not in the local DVC cache")
    assert materialize(md5, root / "out")[0] is False and not (root / "out").exists()


@pytest.mark.parametrize(("md5", "why"), [
    ("0" * 32, "is not the md5 of a directory DVC tracks"),
    ("", "(none) is not the md5 of a directory DVC tracks"),
    ("0" * 32 + ".dir", "is not in the local DVC cache"),
])
def test_what_the_cache_cannot_give_is_none_and_why(tracked, md5, why):
    files, reason = cached_files(md5)
    assert files is None and why in reason


def test_outside_a_dvc_repository_is_none_and_why(tmp_path):
    files, why = cached_files("0" * 32 + ".dir", tmp_path)
    assert files is None and "is not in the local DVC cache" in why
