"""``mlops data contract``: write, compare and update the data contract committed in git.

    mlops data contract init   [--from PATH] [--ranges column|table] [--min-rows N] [--force]
    mlops data contract diff   [PATH]
    mlops data contract update [PATH] [--yes]

The contract file is ``contract.path`` of the params file (``--contract`` overrides it). PATH and
``--from`` default to ``data.source``. ``update`` keeps the class order of the current contract
(the label mapping of every model trained under it) and appends new classes at the end; it never
narrows a feature's range.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ml.errors import PipelineError


def add_parser(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="the data contract", description=__doc__.splitlines()[0])
    groups = data.add_subparsers(dest="group", required=True)
    contract = groups.add_parser("contract", help="init, diff or update the data contract")
    actions = contract.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--contract", help="contract file (default: contract.path of the params file)")
        p.set_defaults(func=cmd_contract)

    p = actions.add_parser("init", help="write the contract from a reference dataset")
    p.add_argument("--from", dest="source", help="reference CSV/Parquet or sklearn:NAME (default: data.source)")
    p.add_argument("--label-column", help="label column of the reference (default: data.label_column)")
    p.add_argument("--ranges", choices=("column", "table"), default="column",
                   help="feature bounds: each column's own min/max, or the table's for every feature")
    p.add_argument("--min-rows", type=int, default=100, help="fewest rows any split may have (default 100)")
    p.add_argument("--max-duplicate-fraction", type=float, default=0.05,
                   help="largest share of rows that repeat another (default 0.05)")
    p.add_argument("--force", action="store_true", help="overwrite an existing contract")
    common(p)
    p = actions.add_parser("diff", help="how a dataset differs from the contract, column by column")
    p.add_argument("path", nargs="?", help="CSV/Parquet or sklearn:NAME (default: data.source)")
    common(p)
    p = actions.add_parser("update", help="show the diff, then rewrite the contract from the dataset")
    p.add_argument("path", nargs="?", help="CSV/Parquet or sklearn:NAME (default: data.source)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    common(p)


def _params(args: argparse.Namespace) -> Any:
    from ml.config import load_params

    return load_params(args.params)


def read_reference(args: argparse.Namespace, source: str | None, label_column: str | None = None) -> tuple[Any, str, str]:
    """The table at ``source`` (default: data.source), its label column and the source's name."""
    from ml.data.prepare import LABEL, SKLEARN_PREFIX, read_source

    data = _params(args).data
    cfg = data.model_copy(update={"source": source}) if source else data
    frame, _, _ = read_source(cfg)
    label = LABEL if cfg.source.startswith(SKLEARN_PREFIX) else (label_column or cfg.label_column)
    return frame, label, cfg.source


def contract_file(args: argparse.Namespace) -> Path:
    return Path(args.contract) if args.contract else Path(_params(args).contract.path)


def cmd_contract(args: argparse.Namespace) -> None:
    from ml.data.contract import diff_table, infer_spec, load_contract, write_contract

    path = contract_file(args)
    if args.action == "init":
        if path.exists() and not args.force:
            raise PipelineError(f"{path} exists; `mlops data contract update` changes it on purpose "
                                "(or init --force to start over)")
        frame, label, source = read_reference(args, args.source, args.label_column)
        spec = infer_spec(frame, label, path.stem, ranges=args.ranges, min_rows=args.min_rows,
                          max_duplicate_fraction=args.max_duplicate_fraction)
        write_contract(path, spec)
        print(f"wrote {path} from {source}: {len(spec.features)} features, classes {', '.join(spec.classes)}")
        return
    contract = load_contract(path)
    frame, _, source = read_reference(args, args.path, contract.spec.label_column)
    lines = diff_table(contract.spec, frame)
    print(f"{source} against {path} (contract version {contract.spec.version}):")
    print("\n".join(f"  {line}" for line in lines) if lines else "  no differences")
    if args.action == "diff":
        if lines:
            raise SystemExit(1)
        return
    if not args.yes:
        if not sys.stdin.isatty():
            raise PipelineError("contract update: confirm with --yes (no terminal to ask on)")
        if input(f"rewrite {path} as version {contract.spec.version + 1}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("left unchanged")
            return
    spec = updated_spec(contract.spec, frame)
    write_contract(path, spec)
    print(f"wrote {path} version {spec.version}: {len(spec.features)} features, classes {', '.join(spec.classes)}")


def updated_spec(old: Any, frame: Any) -> Any:
    """The contract re-derived from ``frame``, keeping the old class order and never narrowing a range."""
    from ml.data.contract import infer_spec

    new = infer_spec(frame, old.label_column, old.name, min_rows=old.min_rows,
                     max_duplicate_fraction=old.max_duplicate_fraction, version=old.version + 1)
    classes = tuple(old.classes) + tuple(c for c in new.classes if c not in old.classes)
    before = {f.name: f for f in old.features}
    features = []
    for feature in new.features:
        was = before.get(feature.name)
        if was is not None and was.dtype == feature.dtype and feature.min is not None and was.min is not None:
            feature = feature.model_copy(update={"min": min(feature.min, was.min), "max": max(feature.max, was.max),
                                                 "nullable": feature.nullable or was.nullable})
        features.append(feature)
    reference = {**new.reference, "labels": {c: new.reference["labels"].get(c, 0.0) for c in classes}}
    return new.model_copy(update={"classes": classes, "features": tuple(features), "max_rows": old.max_rows,
                                  "reference": reference})
