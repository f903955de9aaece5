"""``mlops checkpoints``: list, verify, prune and export the checkpoint tiers.

    mlops checkpoints list   [--dir D] [--tier T] [--json]
    mlops checkpoints verify [--dir D] [--tier T] [NAME] [--json]
    mlops checkpoints prune  [--dir D] [--tier T] [--keep N] [--json]
    mlops checkpoints export TIER REF --version X.Y.Z --description TEXT --intended-use TEXT
                             --limitations TEXT [--dir D] [--json]

``--dir`` defaults to ``checkpoint.dir`` of the runtime settings (``mlops --settings``). REF is a
checkpoint name, ``latest``, or ``best_<metric>`` (milestone tier).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from ml.errors import PipelineError

TIERS = ("training", "milestone", "production")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("checkpoints", help="list, verify, prune and export checkpoints",
                                   description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", help="checkpoint root (default: checkpoint.dir of the params file)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=cmd_checkpoints)

    p = actions.add_parser("list", help="committed checkpoints per tier, with their pointers")
    p.add_argument("--tier", help="one of training, milestone, production (default: all)")
    common(p)
    p = actions.add_parser("verify", help="check every file's size and SHA-256 against its manifest")
    p.add_argument("name", nargs="?", help="one checkpoint (default: all in the tier(s))")
    p.add_argument("--tier", help="one of training, milestone, production (default: all)")
    common(p)
    p = actions.add_parser("prune", help="delete the oldest checkpoints beyond --keep (never a pointer's target)")
    p.add_argument("--tier", default="training", help="training (default) or milestone")
    p.add_argument("--keep", help="checkpoints kept (default for training: checkpoint.keep_last)")
    common(p)
    p = actions.add_parser("export", help="publish a training or milestone checkpoint as a production release")
    p.add_argument("tier", help="training or milestone")
    p.add_argument("ref", help="a checkpoint name, latest, or best_<metric>")
    p.add_argument("--version", required=True, help="semantic version of the release, e.g. 1.2.0")
    p.add_argument("--description", required=True, help="what the model does (model card)")
    p.add_argument("--intended-use", required=True, help="what it is meant for (model card)")
    p.add_argument("--limitations", required=True, help="known limitations (model card)")
    common(p)


def _checkpoint_params(args: argparse.Namespace) -> Any:
    from mlops.cli import settings

    return settings(args).checkpoint


def checkpoint_root(args: argparse.Namespace) -> Path:
    """--dir, else checkpoint.dir of the runtime settings; it must exist."""
    root = Path(args.dir) if args.dir else Path(_checkpoint_params(args).dir)
    if not root.is_dir():
        raise PipelineError(f"--dir {root}: no such directory (expected a checkpoint root with training/, "
                            "milestone/ and production/)")
    return root


def _tiers(value: str | None, allowed: tuple[str, ...] = TIERS) -> tuple[str, ...]:
    if value is None:
        return allowed
    if value not in allowed:
        raise PipelineError(f"--tier {value}: expected one of {', '.join(allowed)}")
    return (value,)


def _keep(args: argparse.Namespace, tier: str) -> int:
    if args.keep is None:
        if tier != "training":
            raise PipelineError(f"--keep: required for the {tier} tier (a whole number >= 0)")
        return _checkpoint_params(args).keep_last
    try:
        keep = int(args.keep)
    except ValueError:
        keep = -1
    if keep < 0:
        raise PipelineError(f"--keep {args.keep}: expected a whole number >= 0")
    return keep


def cmd_checkpoints(args: argparse.Namespace) -> None:
    {"list": cmd_list, "verify": cmd_verify, "prune": cmd_prune, "export": cmd_export}[args.action](args)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _describe(meta: dict[str, Any]) -> str:
    if meta.get("tier") == "milestone":
        return f"{meta['metric']}={meta['value']:.6g} ({meta['mode']}) epoch {meta['epoch']} step {meta['step']}"
    if meta.get("tier") == "production":
        return f"version {meta.get('version')}"
    parts = [f"step {meta.get('step')}"]
    if meta.get("epoch") is not None:
        parts.append(f"epoch {meta['epoch']}")
    if meta.get("world_size"):
        parts.append(f"{meta['world_size']} ranks")
    return " ".join(parts)


def list_tiers(root: Path, tiers: tuple[str, ...]) -> dict[str, Any]:
    """What ``list`` shows: per tier, its committed checkpoints oldest first, its pointers, and the
    visible directories that are not committed checkpoints."""
    from ml.checkpoint.reader import CheckpointReader
    from ml.checkpoint.store import scan_tier

    manager = CheckpointReader(root)
    out: dict[str, Any] = {}
    for tier in tiers:
        committed, rejected = scan_tier(manager.tier_dir(tier))
        pointers = manager.pointers(tier)
        names = {name for name, _ in committed}
        out[tier] = {
            "pointers": {p: n for p, n in pointers.items() if n in names},
            "checkpoints": [{
                "name": name,
                "created": dt.datetime.fromtimestamp(body["created_ns"] / 1e9, dt.timezone.utc).isoformat(
                    timespec="seconds"),
                "bytes": sum(entry["size"] for entry in body["files"].values()),
                "files": len(body["files"]),
                "meta": body["meta"],
                "pointers": sorted(p for p, n in pointers.items() if n == name),
            } for name, body in committed],
            "not_committed": [{"name": name, "reason": reason} for name, reason in rejected],
        }
    return out


def cmd_list(args: argparse.Namespace) -> None:
    root = checkpoint_root(args)
    listing = list_tiers(root, _tiers(args.tier))
    if args.json:
        print(json.dumps({"root": str(root), "tiers": listing}, indent=2, sort_keys=True))
        return
    for tier, info in listing.items():
        print(f"{tier}/  ({len(info['checkpoints'])} committed)")
        for ckpt in info["checkpoints"]:
            marks = f"  [{', '.join(ckpt['pointers'])}]" if ckpt["pointers"] else ""
            print(f"  {ckpt['name']:<40} {_describe(ckpt['meta']):<44} {_size(ckpt['bytes']):>9}  "
                  f"{ckpt['created']}{marks}")
        for bad in info["not_committed"]:
            print(f"  {bad['name']:<40} not committed: {bad['reason']}")


def cmd_verify(args: argparse.Namespace) -> None:
    from ml.checkpoint.reader import CheckpointReader
    from ml.checkpoint.store import CheckpointCorrupt, scan_tier

    root = checkpoint_root(args)
    manager = CheckpointReader(root)
    results = []
    for tier in _tiers(args.tier):
        committed, rejected = scan_tier(manager.tier_dir(tier))
        names = [name for name, _ in committed]
        if args.name is not None:
            if args.name not in names and args.name not in dict(rejected):
                continue
            names = [args.name] if args.name in names else []
            rejected = [(n, r) for n, r in rejected if n == args.name]
        for name in names:
            try:
                manager.verify(tier, name)
                results.append({"tier": tier, "name": name, "ok": True, "reason": None})
            except CheckpointCorrupt as exc:
                results.append({"tier": tier, "name": name, "ok": False, "reason": str(exc)})
        results += [{"tier": tier, "name": name, "ok": False, "reason": reason} for name, reason in rejected]
    if args.name is not None and not results:
        raise PipelineError(f"{args.name}: no such checkpoint under {root} (expected a name from `mlops checkpoints "
                            "list`)")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            where = f"{r['tier']}/{r['name']}"
            print(f"ok       {where}" if r["ok"] else f"CORRUPT  {where}: {r['reason']}")
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise CheckpointCorrupt(f"{len(failed)} of {len(results)} checkpoints under {root} failed verification "
                                f"(first: {failed[0]['tier']}/{failed[0]['name']})")


def cmd_prune(args: argparse.Namespace) -> None:
    from ml.checkpoint.manager import CheckpointManager

    root = checkpoint_root(args)
    if args.tier == "production":
        raise PipelineError("--tier production: releases are never pruned (expected training or milestone)")
    (tier,) = _tiers(args.tier, ("training", "milestone"))
    keep = _keep(args, tier)
    with CheckpointManager(root) as manager:
        deleted = manager.prune(tier, keep)
        kept = manager.list(tier)
    if args.json:
        print(json.dumps({"tier": tier, "deleted": deleted, "kept": kept}, indent=2))
        return
    for name in deleted:
        print(f"deleted  {tier}/{name}")
    print(f"{tier}: {len(kept)} kept")


def cmd_export(args: argparse.Namespace) -> None:
    from ml.checkpoint.manager import CheckpointManager
    from ml.checkpoint.release import export_release

    root = checkpoint_root(args)
    _tiers(args.tier, ("training", "milestone"))
    with CheckpointManager(root) as manager:
        name, stats = export_release(manager, args.tier, args.ref, version=args.version,
                                     description=args.description, intended_use=args.intended_use,
                                     limitations=args.limitations)
        card = manager.load_production(args.version).model_card
    if args.json:
        print(json.dumps({"source": f"{args.tier}/{name}", "release": f"production/{args.version}",
                          "bytes": stats.bytes_written, "model_card": card}, indent=2, sort_keys=True))
        return
    print(f"exported {args.tier}/{name} as production/{args.version} "
          f"(model.safetensors, config.json, model_card.json; {_size(stats.bytes_written)})")
