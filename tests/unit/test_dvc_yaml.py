"""dvc.yaml against the code: each stage lists exactly the params keys its code reads, and as deps
every first-party code package that can change its output.

Both are derived from the source with ``ast`` rather than declared a second time:

- params: in ``tasks/<stage>.py`` and every first-party module it imports, attribute chains on the
  loaded params (``params.train.lr``; ``self.params``/``ctx.params`` too) and on names bound to a
  section (``cfg = params.train`` then ``cfg.lr``). A section used whole (``flatten(cfg)``, passed to
  a function) counts as all of its keys.
- deps: the transitive imports of ``tasks/<stage>.py``, function-level imports included. A module in
  ``ml/<sub>/`` is covered by the directory dep ``ml/<sub>``, one directly in ``ml/`` or ``tasks/``
  by its file, any other first-party package by its directory.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

from ml.config import Params, section_keys
from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
FIRST_PARTY = ("ml", "tasks", "registry", "lineage", "deploy", "mlops", "flows")
# Runtime settings never change what a stage produces (that is their contract, ml/settings.py), so
# editing their defaults must not re-run a stage.
NOT_A_DEP = {"ml/settings.py"}
SECTIONS = {name: info.annotation for name, info in Params.model_fields.items()}
ROOTS = {"params"}  # names (and self./ctx. attributes) that hold the loaded Params


def module_file(module: str) -> Path | None:
    path = REPO / Path(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(path: Path) -> set[str]:
    """First-party modules ``path`` imports anywhere (module level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in FIRST_PARTY and module_file(n) is not None)
    return found


@cache
def import_closure(stage: str) -> frozenset[str]:
    todo, seen = [f"tasks.{stage}"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imported_modules(module_file(module)) - seen)
    return frozenset(seen)


def code_dep(module: str) -> str | None:
    """The dvc.yaml dep that covers ``module`` (None: a package's __init__ or an exempt module)."""
    path = module_file(module).relative_to(REPO)
    if path.name == "__init__.py":
        return None
    parts = path.parts
    if parts[0] == "ml":
        dep = str(path) if len(parts) == 2 else f"ml/{parts[1]}"
    elif parts[0] == "tasks":
        dep = str(path)
    else:
        dep = parts[0]
    return None if dep in NOT_A_DEP else dep


def _chain(node: ast.AST) -> list[str] | None:
    """``params.a.b`` -> ["params", "a", "b"]; ``self.params.a`` -> ["params", "a"]; else None."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    names.append(node.id)
    names.reverse()
    if names[0] in ("self", "ctx") and len(names) > 1:
        names = names[1:]
    return names


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def params_read(path: Path) -> set[str]:
    """Dotted params keys the module reads, and whole sections as the section name."""
    tree = ast.parse(path.read_text())
    parents = _parents(tree)
    aliases: dict[str, str] = {}  # name -> "section" or "section.key"
    sources: set[ast.AST] = set()  # the right-hand sides of those bindings: not reads themselves
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                 and len(target.elts) == len(value.elts) else [(target, value)])
        for name, expr in pairs:
            chain = _chain(expr)
            if isinstance(name, ast.Name) and chain and chain[0] in ROOTS and len(chain) in (2, 3) \
                    and chain[1] in SECTIONS:
                aliases[name.id] = ".".join(chain[1:])
                sources.add(expr)
    reads: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Attribute, ast.Name)) or isinstance(parents.get(node), ast.Attribute) \
                or node in sources:
            continue  # only the outermost node of each attribute chain
        chain = _chain(node)
        if not chain:
            continue
        if chain[0] in ROOTS and len(chain) > 1 and chain[1] in SECTIONS:
            dotted = chain[1:3]
        elif chain[0] in aliases and (len(chain) > 1 or not isinstance(node.ctx, ast.Store)):
            dotted = [*aliases[chain[0]].split("."), *chain[1:]][:2]
        else:
            continue
        reads.add(".".join(dotted))
    return reads


def expand(reads: set[str]) -> set[str]:
    keys: set[str] = set()
    for read in reads:
        section, _, key = read.partition(".")
        keys.update([read] if key else section_keys(SECTIONS[section], section))
    return keys


def test_pipeline_order():
    assert list(STAGES) == ["prepare", "validate", "train", "evaluate", "register"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_params_are_exactly_what_its_code_reads(stage):
    reads = set().union(*(params_read(module_file(m)) for m in import_closure(stage)))
    assert sorted(STAGES[stage]["params"]) == sorted(expand(reads))


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_deps_are_exactly_the_packages_it_imports(stage):
    expected = {dep for m in import_closure(stage) if (dep := code_dep(m))}
    declared = {d for d in STAGES[stage]["deps"] if d.split("/")[0] in FIRST_PARTY}
    assert sorted(declared) == sorted(expected)
    for dep in declared:
        assert (REPO / dep).exists(), dep


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_runs_its_own_module(stage):
    assert STAGES[stage]["cmd"] == f"python -m tasks.{stage}"
    assert f"tasks/{stage}.py" in STAGES[stage]["deps"]


def test_runtime_settings_are_no_params_and_no_deps():
    for stage in STAGES.values():
        assert not any(p.split(".")[0] in ("tracking", "checkpoint", "serve", "promotion") for p in stage["params"])
        assert "ml/settings.py" not in stage["deps"] and "settings.yaml" not in stage["deps"]


def test_the_scan_sees_aliases_whole_sections_and_function_imports(tmp_path):
    """The derivation itself, on a module written for it."""
    source = tmp_path / "stage.py"
    source.write_text(
        "def run(params):\n"
        "    cfg, processed = params.train, params.data.processed_dir\n"
        "    log(cfg.lr, processed)\n"
        "    anomaly = params.anomaly\n"
        "    use(anomaly)\n"
        "    from ml.model.architectures import MLP\n"
        "    return params.register.model_name\n")
    assert params_read(source) == {"train.lr", "data.processed_dir", "anomaly", "register.model_name"}
    assert imported_modules(source) == {"ml.model.architectures"}
    assert code_dep("ml.model.architectures") == "ml/model" and code_dep("ml.io") == "ml/io.py"
    assert code_dep("registry.store") == "registry" and code_dep("ml.settings") is None
