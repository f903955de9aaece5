"""What a retraining decides and what it reports, apart from the flow that wires it.

- :func:`decide`: pure; nothing new when a registered version (the champion, or the newest version)
  came from the same dataset md5, code commit and params; otherwise a retraining, and whether the
  data is new.
- :func:`baseline_of`: that lineage of a registered version, read where lineage/graph.py reads it:
  the version's ``dataset_md5``/``git_commit`` tags and the params of its run's parent pipeline run.
- :func:`compare_on_splits`: champion and challenger scored on the new test split and on the
  champion's own test split, which comes out of the DVC cache by the champion's ``dataset_md5``
  (DVC's own object database reads the ``.dir`` listing).
- :func:`dataset_diff` and :func:`summary_markdown`: what changed, for the Markdown artifact and
  the pipeline run.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Params sections whose values change what a retraining produces (the pipeline run logs them);
# data.source is left out: the dataset md5 is what was read, wherever it came from.
COMPARED_SECTIONS = ("data", "validate", "train", "evaluate", "register", "anomaly")
IGNORED_PARAMS = frozenset({"data.source"})
SKIP, RETRAIN = "skip", "retrain"
VERSION_PREFIX = "retrain_"  # version tags that say what a pending version would replace


@dataclass(frozen=True)
class Baseline:
    """The lineage of a registered version: what it was made from. ``params`` is None when its
    pipeline run is unknown."""

    version: str
    role: str
    dataset_md5: str | None
    git_commit: str | None
    params: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    new_data: bool
    baseline: Baseline | None = None


def compared_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """``section.key -> str(value)`` (as MLflow stores params) of the compared sections."""
    return {k: str(v) for k, v in flat.items()
            if k.split(".", 1)[0] in COMPARED_SECTIONS and k not in IGNORED_PARAMS}


def differences(dataset_md5: str, git_commit: str, params: Mapping[str, str], baseline: Baseline) -> list[str]:
    """What differs between the inputs of this retraining and ``baseline``, one phrase each."""
    found = []
    if dataset_md5 != baseline.dataset_md5:
        found.append(f"dataset {dataset_md5} (v{baseline.version}: {baseline.dataset_md5 or 'not recorded'})")
    if git_commit != baseline.git_commit:
        found.append(f"code commit {git_commit[:12]} (v{baseline.version}: {(baseline.git_commit or 'not recorded')[:12]})")
    if baseline.params is None:
        found.append(f"params (v{baseline.version}'s are not recorded)")
    else:
        changed = sorted(k for k in set(params) | set(baseline.params) if params.get(k) != baseline.params.get(k))
        if changed:
            shown = ", ".join(f"{k}={params.get(k, '(unset)')} (v{baseline.version}: {baseline.params.get(k, '(unset)')})"
                              for k in changed[:5])
            found.append(f"params {shown}" + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
    return found


def decide(model_name: str, dataset_md5: str, git_commit: str, params: Mapping[str, str],
           baselines: list[Baseline]) -> Decision:
    """Skip when some baseline has the same dataset, commit and params; else retrain. ``new_data``:
    the dataset differs from every baseline's (the first baseline, the champion when there is one,
    names the reason)."""
    if not baselines:
        return Decision(RETRAIN, f"{model_name} has no registered version yet", True)
    for baseline in baselines:
        if not differences(dataset_md5, git_commit, params, baseline):
            return Decision(SKIP, f"nothing new: dataset {dataset_md5}, code commit {git_commit[:12]} and params "
                                  f"equal those of {model_name} v{baseline.version} ({baseline.role})",
                            False, baseline)
    first = baselines[0]
    new_data = all(dataset_md5 != b.dataset_md5 for b in baselines)
    return Decision(RETRAIN, f"changed since {model_name} v{first.version} ({first.role}): "
                             + "; ".join(differences(dataset_md5, git_commit, params, first)), new_data, first)


def baseline_of(client: Any, record: Any, role: str) -> Baseline:
    """The lineage of a registry version record (registry.store.VersionRecord)."""
    params = None
    try:
        run = client.get_run(record.run_id) if record.run_id else None
        parent = run.data.tags.get("mlflow.parentRunId") if run else None
        if parent:
            params = compared_params(client.get_run(parent).data.params) or None
    except Exception:  # noqa: BLE001 - a deleted run: its params are simply unknown, so never "the same"
        params = None
    return Baseline(record.version, role, record.tags.get("dataset_md5"), record.tags.get("git_commit"), params)


def baselines(client: Any, model_name: str) -> list[Baseline]:
    """The champion and the newest version of ``model_name`` (either may be missing; the same version once)."""
    from ml.errors import RegistryError
    from registry.store import champion, list_versions

    found = []
    holder = champion(client, model_name)
    if holder is not None:
        found.append(baseline_of(client, holder, "champion"))
    try:
        versions = list_versions(client, model_name)
    except RegistryError:
        versions = []
    if versions and (holder is None or versions[-1].version != holder.version):
        found.append(baseline_of(client, versions[-1], f"newest, {versions[-1].status}"))
    return found


def materialize_dvc_dir(md5: str, dest: Path, repo_dir: str | Path = ".") -> bool:
    """Copies the prepared directory whose DVC md5 is ``md5`` out of the local DVC cache into
    ``dest`` (:func:`ml.data.dvc_cache.materialize`); False, with one line saying why, when the
    cache does not hold all of it or it is not a prepared split directory."""
    from ml.data.dvc_cache import materialize

    done, why = materialize(md5, dest, repo_dir)
    if not done:
        if md5.endswith(".dir"):
            print(f"DVC cache: {why}")
        return False
    return (dest / "test.parquet").is_file() and (dest / "schema.json").is_file()


@dataclass
class SplitScores:
    """Accuracy of the champion and the challenger on one test split (None: could not score, ``why``)."""

    split: str
    dataset_md5: str | None
    rows: int = 0
    champion: float | None = None
    challenger: float | None = None
    why: str = ""

    @property
    def delta(self) -> float | None:
        return None if self.champion is None or self.challenger is None else self.challenger - self.champion


@dataclass
class Comparison:
    champion_version: str | None
    splits: list[SplitScores] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"champion_version": self.champion_version,
                "splits": [{**asdict(s), "delta": s.delta} for s in self.splits]}

    def metrics(self) -> dict[str, float]:
        """Run metrics: ``retrain/<split>/{champion,challenger,delta}_accuracy``."""
        out = {}
        for s in self.splits:
            for name, value in (("champion", s.champion), ("challenger", s.challenger), ("delta", s.delta)):
                if value is not None:
                    out[f"retrain/{s.split}/{name}_accuracy"] = value
        return out

    def version_tags(self) -> dict[str, str]:
        """Tags on the registered version: what it would replace and by how much, on each split."""
        tags = {f"{VERSION_PREFIX}replaces": self.champion_version or "none"}
        for s in self.splits:
            tags[f"{VERSION_PREFIX}{s.split}_dataset"] = s.dataset_md5 or "unknown"
            if s.delta is not None:
                tags[f"{VERSION_PREFIX}{s.split}_champion_accuracy"] = f"{s.champion:.6f}"
                tags[f"{VERSION_PREFIX}{s.split}_challenger_accuracy"] = f"{s.challenger:.6f}"
                tags[f"{VERSION_PREFIX}{s.split}_delta"] = f"{s.delta:+.6f}"
            else:
                tags[f"{VERSION_PREFIX}{s.split}_delta"] = f"not measured: {s.why}"[:5000]
        return tags


def _score(model: Any, processed_dir: str | Path) -> float:
    from registry.challenger import accuracy_on_test_split

    return accuracy_on_test_split(model, processed_dir)


def compare_on_splits(client: Any, model_name: str, challenger_uri: str, processed_dir: str,
                      dataset_md5: str) -> Comparison:
    """Champion and challenger on the new test split (``processed_dir``) and on the champion's own
    (from the DVC cache); a split that cannot be scored says why."""
    import mlflow.pytorch
    import pandas as pd

    from ml.errors import PipelineError
    from registry.challenger import load_registered_model
    from registry.store import champion

    holder = champion(client, model_name)
    new = SplitScores("new_test", dataset_md5, rows=len(pd.read_parquet(Path(processed_dir) / "test.parquet")))
    if holder is None:
        new.why = f"{model_name} has no champion"
        return Comparison(None, [new])
    own = SplitScores("champion_test", holder.tags.get("dataset_md5"))
    challenger = mlflow.pytorch.load_model(challenger_uri, map_location="cpu")
    try:
        incumbent = load_registered_model(model_name, holder.version)
    except PipelineError as exc:
        new.why = own.why = str(exc)
        return Comparison(holder.version, [new, own])
    with tempfile.TemporaryDirectory(prefix="mlops-champion-split-") as tmp:
        splits = [(new, processed_dir)]
        if own.dataset_md5 and materialize_dvc_dir(own.dataset_md5, Path(tmp)):
            own.rows = len(pd.read_parquet(Path(tmp) / "test.parquet"))
            splits.append((own, tmp))
        else:
            own.why = f"the data of {model_name} v{holder.version} ({own.dataset_md5}) is not in the local DVC cache"
        for scores, directory in splits:
            try:
                scores.champion = _score(incumbent, directory)
                scores.challenger = _score(challenger, directory)
            # a different input signature: eager modules raise RuntimeError, exported programs a guard
            except (RuntimeError, AssertionError, PipelineError) as exc:
                scores.champion = scores.challenger = None
                scores.why = str(exc).splitlines()[0][:300]
    return Comparison(holder.version, [new, own])


def class_shares(labels: Any) -> dict[str, float]:
    counts = labels.astype(str).value_counts(normalize=True)
    return {str(k): round(float(v), 4) for k, v in sorted(counts.items())}


def dataset_diff(processed_dir: str, drift_report: str | Path | None, champion_dir: str | Path | None = None
                 ) -> dict[str, Any]:
    """Rows and class shares of the new data (and of the champion's, when given), and the worst
    drifting features of the drift report (when validate wrote one)."""
    import pandas as pd

    def summary(directory: str | Path) -> dict[str, Any]:
        frames = [pd.read_parquet(p) for p in sorted(Path(directory).glob("*.parquet"))]
        frame = pd.concat(frames) if frames else pd.DataFrame({"label": []})
        return {"rows": int(len(frame)), "class_shares": class_shares(frame["label"])}

    diff: dict[str, Any] = {"new": summary(processed_dir)}
    if champion_dir is not None:
        diff["champion"] = summary(champion_dir)
    if drift_report is not None and Path(drift_report).is_file():
        report = json.loads(Path(drift_report).read_text())
        diff["drift"] = {"level": report["level"], "reference": report["reference"],
                         "label_psi": report["label"]["psi"],
                         "worst": [{k: r[k] for k in ("feature", "psi", "ks_pvalue", "level")}
                                   for r in report["features"][:5]]}
    return diff


def _acc(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The retraining's Markdown artifact: decision, dataset diff, comparison on both splits, next command."""
    lines = [f"# Retraining: {summary['decision']}", "", summary["reason"], "",
             f"- source: `{summary.get('source', '?')}`", f"- dataset: `{summary.get('dataset_md5') or '—'}`",
             f"- code commit: `{summary.get('git_commit', '?')}`"]
    diff = summary.get("dataset_diff") or {}
    if diff:
        lines += ["", "## Dataset", "", "| | rows | class shares |", "|---|---|---|"]
        for who in ("new", "champion"):
            if who in diff:
                shares = ", ".join(f"{k}: {v:.3f}" for k, v in diff[who]["class_shares"].items())
                lines.append(f"| {who} | {diff[who]['rows']} | {shares} |")
        if "drift" in diff:
            drift = diff["drift"]
            lines += ["", f"Drift **{drift['level']}** against {drift['reference']} (label PSI "
                          f"{drift['label_psi']:.3f}). Worst features:", "",
                      "| feature | PSI | KS p-value | level |", "|---|---|---|---|"]
            lines += [f"| {r['feature']} | {r['psi']:.3f} | {r['ks_pvalue']:.3g} | {r['level']} |" for r in drift["worst"]]
    comparison = summary.get("comparison")
    if comparison:
        lines += ["", f"## Challenger vs champion v{comparison['champion_version'] or '—'}", "",
                  "| test split | dataset | rows | champion | challenger | delta |", "|---|---|---|---|---|---|"]
        for s in comparison["splits"]:
            delta = "—" if s["delta"] is None else f"{s['delta']:+.4f}"
            note = f" ({s['why']})" if s["why"] else ""
            lines.append(f"| {s['split']}{note} | `{s['dataset_md5'] or '—'}` | {s['rows']} | {_acc(s['champion'])} | "
                         f"{_acc(s['challenger'])} | {delta} |")
    registered = summary.get("registered")
    if registered:
        name, version = registered["model_name"], registered["version"]
        lines += ["", f"## Registered {name} v{version}: {registered['status']}", "", "Next:", "", "```",
                  f"mlops models approve {name} {version} --reason '...'",
                  f"mlops models reject {name} {version} --reason '...'", "```"]
    elif summary.get("error"):
        lines += ["", "## Why it stopped", "", "```", str(summary["error"])[:4000], "```"]
    return "\n".join(lines) + "\n"


def replacement_line(tags: Mapping[str, str]) -> str:
    """What ``mlops models list`` says of a version a retraining registered: the champion it would
    replace and the accuracy change on each test split (from :meth:`Comparison.version_tags`)."""
    replaces = tags.get(f"{VERSION_PREFIX}replaces")
    if replaces is None:
        return ""
    if replaces == "none":
        return "replaces no champion"
    parts = []
    for split in ("new_test", "champion_test"):
        delta = tags.get(f"{VERSION_PREFIX}{split}_delta")
        if delta is None:
            continue
        if f"{VERSION_PREFIX}{split}_challenger_accuracy" in tags:
            parts.append(f"{split} {float(tags[f'{VERSION_PREFIX}{split}_champion_accuracy']):.4f} -> "
                         f"{float(tags[f'{VERSION_PREFIX}{split}_challenger_accuracy']):.4f} ({float(delta):+.4f})")
        else:
            parts.append(f"{split} {delta}")
    return f"would replace champion v{replaces}: " + "; ".join(parts)
