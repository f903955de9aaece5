from ml.provenance import dir_md5, git_info, locked_md5


def test_dir_md5_depends_on_content_and_names_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
    (a / "x.txt").write_text("1")
    (a / "sub" / "y.txt").write_text("2")
    (b / "sub" / "y.txt").write_text("2")
    (b / "x.txt").write_text("1")
    assert dir_md5(a) == dir_md5(b) and dir_md5(a).endswith(".dir")
    (b / "x.txt").write_text("changed")
    assert dir_md5(a) != dir_md5(b)


def test_locked_md5_reads_dvc_lock(tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n    - path: data/processed\n"
        "      md5: abc.dir\n")
    assert locked_md5("data/processed", tmp_path / "dvc.lock") == "abc.dir"
    assert locked_md5("data/raw", tmp_path / "dvc.lock") is None
    assert locked_md5("data/raw", tmp_path / "missing.lock") is None


def test_git_info_outside_a_repository(tmp_path):
    assert git_info(tmp_path).commit == "unknown"
