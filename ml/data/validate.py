"""validate: the data gate, a Great Expectations suite run over each split.

The suite is built from the ``validate`` params (the data contract) and the schema prepare wrote.
Class balance has no built-in GX expectation, so it is checked as an ordinary GX expectation over a
derived table of per-class shares: the report still names the expectation and the classes that
broke it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ml.config import ValidateConfig
from ml.data.prepare import LABEL, SPLITS, Schema
from ml.errors import DataError, ValidationFailed
from ml.io import atomic_write_json


@dataclass(frozen=True)
class Check:
    """One expectation to run on one table (``rows`` = the split, ``classes`` = per-class shares)."""

    table: str
    expectation: Any


def build_checks(cfg: ValidateConfig, schema: Schema) -> list[Check]:
    import great_expectations as gx

    e = gx.expectations
    features = list(schema.features)
    num_classes = cfg.num_classes if cfg.num_classes is not None else schema.num_classes
    checks = [
        Check("rows", e.ExpectTableColumnsToMatchOrderedList(column_list=[*features, LABEL])),
        Check("rows", e.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows)),
        Check("rows", e.ExpectColumnValuesToBeOfType(column=LABEL, type_="int64")),
        Check("rows", e.ExpectColumnValuesToNotBeNull(column=LABEL)),
        Check("rows", e.ExpectColumnValuesToBeInSet(column=LABEL, value_set=list(range(num_classes)))),
        Check("classes", e.ExpectColumnValuesToBeBetween(column="share", min_value=cfg.min_class_fraction,
                                                         max_value=cfg.max_class_fraction)),
    ]
    if cfg.num_features is not None:
        checks.append(Check("rows", e.ExpectTableColumnCountToEqual(value=cfg.num_features + 1)))
    for column in features:
        checks.append(Check("rows", e.ExpectColumnValuesToBeOfType(column=column, type_="float64")))
        checks.append(Check("rows", e.ExpectColumnValuesToNotBeNull(column=column)))
        if cfg.feature_min is not None or cfg.feature_max is not None:
            checks.append(Check("rows", e.ExpectColumnValuesToBeBetween(
                column=column, min_value=cfg.feature_min, max_value=cfg.feature_max)))
    return checks


def class_shares(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per class present: its label and its share of the rows."""
    if LABEL not in frame.columns or frame.empty:
        return pd.DataFrame({"class": pd.Series(dtype="int64"), "share": pd.Series(dtype="float64")})
    shares = frame[LABEL].value_counts(normalize=True).sort_index()
    return pd.DataFrame({"class": shares.index, "share": shares.to_numpy()})


def _describe(result: Any, table: str) -> dict[str, Any]:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
    details = result.result or {}
    entry: dict[str, Any] = {"expectation": config.type, "kwargs": kwargs, "success": bool(result.success)}
    if table == "classes":
        entry["table"] = "class shares"
    for key in ("unexpected_count", "unexpected_percent", "element_count", "observed_value",
                "partial_unexpected_list"):
        if details.get(key) is not None:
            entry[key] = details[key]
    if result.exception_info and result.exception_info.get("raised_exception"):
        entry["error"] = str(result.exception_info.get("exception_message"))
    return entry


def validate_frames(frames: dict[str, pd.DataFrame], cfg: ValidateConfig, schema: Schema) -> dict[str, Any]:
    """Runs the suite over each split; returns a JSON-able report (``success`` and failures per split)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("splits")
    checks = build_checks(cfg, schema)
    suites = {}
    for table in ("rows", "classes"):
        suite = gx.ExpectationSuite(name=f"data-contract-{table}")
        for check in checks:
            if check.table == table:
                suite.add_expectation(check.expectation)
        suites[table] = context.suites.add(suite)
    report: dict[str, Any] = {"success": True, "splits": {}}
    for name, frame in frames.items():
        results = []
        for table, data in (("rows", frame), ("classes", class_shares(frame))):
            batch = source.add_dataframe_asset(f"{name}-{table}").add_batch_definition_whole_dataframe("all")
            outcome = batch.get_batch(batch_parameters={"dataframe": data}).validate(suites[table])
            results += [_describe(r, table) for r in outcome.results]
        failed = [r for r in results if not r["success"]]
        report["splits"][name] = {"success": not failed, "rows": len(frame), "evaluated": len(results),
                                  "failed": failed}
        report["success"] &= not failed
    return report


def format_failures(report: dict[str, Any]) -> str:
    """A readable list: one line per failed expectation, with how many rows broke it."""
    lines = []
    for split_name, split in report["splits"].items():
        for f in split["failed"]:
            column = f["kwargs"].get("column")
            where = f"{split_name}" + (f".{column}" if column else "") + (f" ({f['table']})" if "table" in f else "")
            if "unexpected_count" in f:
                unit = "classes" if "table" in f else "rows"
                what = f"{f['unexpected_count']} of {f.get('element_count', '?')} {unit} broke it"
                if f.get("partial_unexpected_list"):
                    what += f", e.g. {f['partial_unexpected_list'][:3]}"
            elif "observed_value" in f:
                what = f"observed {f['observed_value']}"
            else:
                what = f.get("error", "failed")
            args = {k: v for k, v in f["kwargs"].items() if k != "column"}
            lines.append(f"  {where}: {f['expectation']} {args}: {what}")
    return "\n".join(lines)


def validate(cfg: ValidateConfig, processed_dir: str | Path) -> dict[str, Any]:
    """The validate stage: writes the report, and raises :class:`ValidationFailed` when any split fails."""
    processed_dir = Path(processed_dir)
    if not (processed_dir / "schema.json").is_file():
        raise DataError(f"{processed_dir}: no prepared data (schema.json missing); run the prepare stage first")
    schema = Schema.read(processed_dir)
    frames = {name: pd.read_parquet(processed_dir / f"{name}.parquet") for name in SPLITS}
    report = validate_frames(frames, cfg, schema)
    atomic_write_json(cfg.report, report)
    if not report["success"]:
        failures = format_failures(report)
        count = failures.count("\n") + 1
        raise ValidationFailed(f"data validation failed: {count} expectation(s) broken "
                               f"(report: {cfg.report})\n{failures}")
    return report
