"""A directory DVC tracked, found in the local DVC cache by its md5 (``<hash>.dir``), as a model
version's lineage records it (``dataset_md5``).

The listing and the files are read through DVC's own object database (``repo.cache.local`` and
``dvc_data``'s ``Tree``), not by walking ``.dvc/cache`` by hand: the cache's layout is DVC's to
change between versions. What DVC has no call for is "this directory's files, or why not", which is
all this module adds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["cached_files", "materialize"]


def cached_files(md5: str, repo_dir: str | Path = ".") -> tuple[dict[str, Path] | None, str]:
    """``({relative path: file in the cache}, "")`` for every file of the directory whose DVC md5 is
    ``md5``, or ``(None, why not)``: not a directory hash, not a DVC repository, no such listing in
    the cache, or a file of it missing there."""
    if not md5.endswith(".dir"):
        return None, f"{md5 or '(none)'} is not the md5 of a directory DVC tracks"
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    try:
        with Repo(str(repo_dir)) as repo:
            odb = repo.cache.local
            tree = Tree.load(odb, HashInfo("md5", md5))
            files = {"/".join(key): Path(odb.oid_to_path(info.value)) for key, _, info in tree}
    except Exception as exc:  # noqa: BLE001 - not a DVC repository, no such listing, or a damaged one
        return None, f"{md5} is not in the local DVC cache ({exc.__class__.__name__}: " \
                     f"{(str(exc).splitlines() or [''])[0][:160]})"
    missing = sorted(name for name, path in files.items() if not path.is_file())
    if missing:
        return None, f"{md5}: {', '.join(missing[:3])} not in the local DVC cache"
    return files, ""


def materialize(md5: str, dest: Path, repo_dir: str | Path = ".") -> tuple[bool, str]:
    """Copies the directory whose DVC md5 is ``md5`` out of the local cache into ``dest``:
    ``(True, "")``, or ``(False, why not)`` with nothing copied."""
    files, why = cached_files(md5, repo_dir)
    if files is None:
        return False, why
    for name, source in files.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return True, ""
