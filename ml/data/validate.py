"""validate: the data gate, the contract's Great Expectations suite run over each split, then drift.

The suite comes from the contract file committed in git (ml.data.contract), never from the data
being checked. Class balance has no built-in GX expectation, so it is checked as an ordinary GX
expectation over a derived table of per-class shares: the report still names the expectation and
the classes that broke it. An expectation whose severity is ``warning`` (in the file, or the
contract's class-presence check under ``allow_missing_classes``) is reported without failing the gate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from ml.data.contract import LABEL, Contract
from ml.data.drift import FAIL, DriftThresholds, measure_drift, plot_drift, reference_statistics, summary_line
from ml.data.prepare import SPLITS
from ml.errors import DataError, ValidationFailed
from ml.io import atomic_write_json

CLASS_PRESENCE = "expect_column_distinct_values_to_contain_set"
ORDERED_COLUMNS = "expect_table_columns_to_match_ordered_list"


def class_shares(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per class present: its name and its share of the rows."""
    if LABEL not in frame.columns or frame.empty:
        return pd.DataFrame({"class": pd.Series(dtype="string"), "share": pd.Series(dtype="float64")})
    shares = frame[LABEL].value_counts(normalize=True).sort_index()
    return pd.DataFrame({"class": shares.index.astype("string"), "share": shares.to_numpy()})


def share_expectations(min_class_fraction: float, max_class_fraction: float) -> list[Any]:
    import great_expectations as gx

    return [gx.expectations.ExpectColumnValuesToBeBetween(column="share", min_value=min_class_fraction,
                                                          max_value=max_class_fraction)]


def _describe(result: Any, table: str, columns: list[str]) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column_list", "value_set")}
    details = result.result or {}
    entry: dict[str, Any] = {"expectation": config.type, "kwargs": kwargs, "success": bool(result.success),
                             "severity": str(getattr(config.severity, "value", config.severity))}
    if table == "classes":
        entry["table"] = "class shares"
    for key in ("unexpected_count", "unexpected_percent", "element_count", "observed_value",
                "partial_unexpected_list", "partial_missing_list"):
        if details.get(key) is not None:
            entry[key] = details[key]
    if config.type == ORDERED_COLUMNS and not result.success:
        expected, found = list(config.kwargs["column_list"]), list(details.get("observed_value") or columns)
        entry["missing_columns"] = [c for c in expected if c not in found]
        entry["unexpected_columns"] = [c for c in found if c not in expected]
        moved = next(((i, f, e) for i, (f, e) in enumerate(zip(found, expected)) if f != e), None)
        if moved is not None:
            entry["first_mismatch"] = {"position": moved[0], "found": moved[1], "expected": moved[2]}
        entry.pop("observed_value", None)
    if config.type == CLASS_PRESENCE and details.get("partial_missing_list"):
        absent = set(map(str, details["partial_missing_list"]))
        entry["partial_missing_list"] = [c for c in config.kwargs["value_set"] if c in absent]
    needed = [config.kwargs["column"]] if config.kwargs.get("column") else list(config.kwargs.get("column_list") or [])
    absent_columns = [c for c in needed if c not in columns]
    if absent_columns and config.type != ORDERED_COLUMNS:
        entry["error"] = f"column {', '.join(absent_columns)} not in the data"
    elif result.exception_info and result.exception_info.get("raised_exception"):
        entry["error"] = str(result.exception_info.get("exception_message"))
    return entry


def _run_suites(frames: dict[str, pd.DataFrame], suites: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("splits")
    added = {table: context.suites.add(suite) for table, suite in suites.items()}
    report: dict[str, Any] = {"success": True, "splits": {}}
    for name, frame in frames.items():
        results = []
        for table, data in (("rows", frame), ("classes", class_shares(frame))):
            batch = source.add_dataframe_asset(f"{name}-{table}").add_batch_definition_whole_dataframe("all")
            outcome = batch.get_batch(batch_parameters={"dataframe": data}).validate(added[table])
            results += [_describe(r, table, [str(c) for c in data.columns]) for r in outcome.results]
        results.sort(key=lambda r: (r["expectation"] != ORDERED_COLUMNS, str(r["kwargs"].get("column", ""))))
        failed = [r for r in results if not r["success"] and r["severity"] == "critical"]
        warned = [r for r in results if not r["success"] and r["severity"] != "critical"]
        report["splits"][name] = {"success": not failed, "rows": len(frame), "evaluated": len(results),
                                  "failed": failed, "warnings": warned}
        report["success"] &= not failed
    return report


def validate_frames(frames: dict[str, pd.DataFrame], contract: Contract, *, min_class_fraction: float = 0.0,
                    max_class_fraction: float = 1.0, allow_missing_classes: bool = False) -> dict[str, Any]:
    """Runs the contract's suite (and the class-share bounds) over each split; returns a JSON-able
    report: ``success``, and per split the failed and the warning expectations."""
    import great_expectations as gx

    def as_run(x: Any) -> Any:
        warn = allow_missing_classes and x.expectation_type == CLASS_PRESENCE and x.column == LABEL
        return x.copy(update={"id": None, **({"severity": "warning"} if warn else {})})

    rows = gx.ExpectationSuite(name=f"{contract.spec.name}-rows",
                               expectations=[as_run(x) for x in contract.suite.expectations])
    classes = gx.ExpectationSuite(name=f"{contract.spec.name}-classes",
                                  expectations=share_expectations(min_class_fraction, max_class_fraction))
    report = _run_suites(frames, {"rows": rows, "classes": classes})
    report["contract"] = contract.reference()
    return report


def _where(split_name: str, f: dict[str, Any]) -> str:
    column = f["kwargs"].get("column")
    return f"{split_name}" + (f".{column}" if column else "") + (f" ({f['table']})" if "table" in f else "")


def _what(f: dict[str, Any]) -> str:
    if "missing_columns" in f:
        parts = ([f"missing {', '.join(f['missing_columns'][:5])}"] if f["missing_columns"] else []) + \
                ([f"unexpected {', '.join(f['unexpected_columns'][:5])}"] if f["unexpected_columns"] else [])
        if not parts and "first_mismatch" in f:
            m = f["first_mismatch"]
            parts = [f"columns out of order: position {m['position']} is {m['found']}, expected {m['expected']}"]
        return "; ".join(parts) or "columns out of order"
    if f.get("partial_missing_list"):
        return f"classes absent: {', '.join(map(str, f['partial_missing_list'][:10]))}"
    if "error" in f:
        return f["error"]
    if "unexpected_count" in f:
        unit = "classes" if "table" in f else "rows"
        what = f"{f['unexpected_count']} of {f.get('element_count', '?')} {unit} broke it"
        if f.get("partial_unexpected_list"):
            what += f", e.g. {f['partial_unexpected_list'][:3]}"
        return what
    if "observed_value" in f:
        return f"observed {f['observed_value']}"
    return "failed"


def format_failures(report: dict[str, Any], key: str = "failed") -> str:
    """A readable list: one line per failed (or warning) expectation, naming split, column and expectation."""
    lines = []
    for split_name, split in report["splits"].items():
        for f in split.get(key, []):
            args = {k: v for k, v in f["kwargs"].items() if k not in ("column", "ignore_row_if")}
            lines.append(f"  {_where(split_name, f)}: {f['expectation']} {args}: {_what(f)}")
    return "\n".join(lines)


def check_dataset(table: pd.DataFrame, contract: Contract, source: str, *, allow_missing_classes: bool = False) -> None:
    """The contract's suite over a whole dataset version before prepare writes any of it: a table
    that breaks the contract raises :class:`ValidationFailed` naming each expectation and column."""
    report = validate_frames({"dataset": table}, contract, allow_missing_classes=allow_missing_classes)
    if not report["success"]:
        failed = report["splits"]["dataset"]["failed"]
        raise ValidationFailed(f"data validation failed: {source} breaks the data contract {contract.path}: "
                               f"{len(failed)} expectation(s) broken\n{format_failures(report)}")


def drift_inputs(frames: dict[str, pd.DataFrame], contract: Contract) -> tuple[pd.DataFrame, pd.Series]:
    """The whole dataset version (every split) as numeric features and class names."""
    rows = pd.concat(list(frames.values()), ignore_index=True)
    numeric = [f.name for f in contract.spec.features if f.name in rows.columns and f.dtype == "float64"]
    return rows[numeric].apply(pd.to_numeric, errors="coerce"), rows[LABEL].astype(str)


def validate(processed_dir: str | Path, contract: Contract, report_path: str | Path, *,
             min_class_fraction: float = 0.0, max_class_fraction: float = 1.0, allow_missing_classes: bool = False,
             drift: DriftThresholds | None = None, drift_report: str | Path | None = None,
             drift_plot: str | Path | None = None, drift_reference: pd.DataFrame | None = None,
             drift_source: str = "contract") -> dict[str, Any]:
    """The validate stage: writes the report (and the drift report and plot when the data keeps the
    contract), and raises :class:`ValidationFailed` when any split breaks the contract or drift fails.

    ``drift_reference`` is a reference table (the champion's training split); without it drift is
    measured against the contract's reference statistics.
    """
    processed_dir = Path(processed_dir)
    if not (processed_dir / "schema.json").is_file():
        raise DataError(f"{processed_dir}: no prepared data (schema.json missing); run the prepare stage first")
    for stale in (drift_report, drift_plot):  # this stage's outputs: never left from an earlier run
        if stale is not None:
            Path(stale).unlink(missing_ok=True)
    frames = {name: pd.read_parquet(processed_dir / f"{name}.parquet") for name in SPLITS}
    report = validate_frames(frames, contract, min_class_fraction=min_class_fraction,
                             max_class_fraction=max_class_fraction, allow_missing_classes=allow_missing_classes)
    problems = []
    if report["success"] and drift is not None:
        table, labels = drift_inputs(frames, contract)
        reference, ref_table = contract.spec.reference, None
        if drift_reference is not None:
            ref_table, ref_labels = drift_inputs({"reference": drift_reference}, contract)
            reference = reference_statistics(ref_table, ref_labels, contract.spec.classes)
        measured = measure_drift(table, labels, reference, drift, reference_table=ref_table, source=drift_source)
        report["drift"] = {"level": measured["level"], "summary": summary_line(measured),
                           "failed": measured.get("failed", []), "warned": measured.get("warned", [])}
        if drift_report is not None:
            atomic_write_json(drift_report, measured)
        if drift_plot is not None:
            plot_drift(measured, drift_plot)
        if measured["level"] == FAIL:
            report["success"] = False
            problems.append(f"  {summary_line(measured)}; failed: {', '.join(measured.get('failed', [])[:10])}")
    atomic_write_json(report_path, report)
    failures = format_failures(report)
    if failures or problems:
        lines = [line for line in (failures, *problems) if line]
        count = sum(len(s["failed"]) for s in report["splits"].values())
        head = (f"data validation failed: {count} expectation(s) broken" if count else "data validation failed: drift")
        raise ValidationFailed(f"{head} (report: {report_path})\n" + "\n".join(lines))
    return report
