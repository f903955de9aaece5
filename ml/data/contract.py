"""The data contract: a Great Expectations suite committed in git, checked against every dataset version.

The file is a GX expectation suite as GX keeps them (``gx/expectations/<name>.json``). Its
expectations are what the gate runs; its ``meta.data_contract`` holds what the rest of the pipeline
needs besides checks: the feature columns in order with their dtypes, and the class list whose order
is the label mapping (index ``i`` of every model trained under the contract means ``classes[i]``),
plus the reference statistics that drift is measured against. ``init`` and ``update`` write both
parts from one reference table, so they always agree; expectations added to the file by hand are
run as well.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ml.errors import PipelineError
from ml.io import atomic_write_text

LABEL = "label"
META_KEY = "data_contract"
NUMERIC_DTYPE = "float64"
DEFAULT_CONTRACT = "gx/expectations/digits.json"


class ContractError(PipelineError):
    """The contract file is missing or malformed, or a dataset or model version breaks it."""


class FeatureSpec(BaseModel):
    """One feature column of the contract."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="column name, as the source table names it")
    dtype: str = Field(description="pandas dtype after prepare: float64 for every numeric column")
    min: float | None = Field(description="lowest allowed value, or null for no bound")
    max: float | None = Field(description="highest allowed value, or null for no bound")
    nullable: bool = Field(description="whether empty values are allowed")


class ContractSpec(BaseModel):
    """``meta.data_contract`` of the suite file: the schema and label mapping every version shares."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="the contract's name (the suite name and the file's stem)")
    version: int = Field(ge=1, description="bumped by every `mlops data contract update`")
    label_column: str = Field(description="label column of the source table")
    features: tuple[FeatureSpec, ...] = Field(min_length=1, description="feature columns, in order")
    classes: tuple[str, ...] = Field(min_length=1, description="class names; the order is the label mapping")
    min_rows: int = Field(ge=1, description="fewest rows any split may have")
    max_rows: int | None = Field(default=None, ge=1, description="most rows any split may have, or null")
    max_duplicate_fraction: float = Field(ge=0, le=1, description="largest share of rows that repeat another")
    reference: dict[str, Any] = Field(description="reference statistics for drift (see ml.data.drift)")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def signature(self) -> dict[str, Any]:
        """What a model trained under this contract takes and returns: inputs in order, and classes."""
        return {"inputs": [[f.name, f.dtype] for f in self.features], "classes": list(self.classes)}


@dataclass(frozen=True)
class Contract:
    """A loaded contract: its spec, the GX suite to run, and the file it came from with its digest."""

    spec: ContractSpec
    suite: Any
    path: str
    digest: str

    def reference(self) -> dict[str, Any]:
        return {"path": self.path, "digest": self.digest, "name": self.spec.name, "version": self.spec.version}


def class_name(value: Any) -> str:
    """The class name of a raw label: integral floats lose their ``.0`` (a CSV column with an empty
    cell reads as floats), everything else is ``str``."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (np.integer, np.bool_)):
        return str(value.item())
    return str(value)


def ordered_classes(labels: pd.Series) -> tuple[str, ...]:
    """Distinct labels as class names, numerically ordered when every label is a number."""
    values = labels.dropna().unique()
    if pd.api.types.is_numeric_dtype(labels):
        values = sorted(values)
    else:
        values = sorted(values, key=str)
    names: list[str] = []
    for value in values:
        name = class_name(value)
        if name not in names:
            names.append(name)
    return tuple(names)


def is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def infer_spec(frame: pd.DataFrame, label_column: str, name: str, *, ranges: str = "column",
               min_rows: int = 50, max_duplicate_fraction: float = 0.05, version: int = 1,
               bins: int = 10) -> ContractSpec:
    """A contract from a reference table (the raw source, label column included).

    ``ranges="column"`` bounds each feature by its own observed min/max; ``"table"`` gives every
    feature the table-wide min/max (pixels and other features that share one domain).
    """
    from ml.data.drift import reference_statistics

    if label_column not in frame.columns:
        raise ContractError(f"reference data: label column {label_column!r} not found")
    if ranges not in ("column", "table"):
        raise ContractError(f"--ranges {ranges}: expected column or table")
    features = [str(c) for c in frame.columns if c != label_column]
    if not features:
        raise ContractError(f"reference data: no feature columns besides the label {label_column!r}")
    numeric = [c for c in features if is_numeric(frame[c])]
    table = frame[numeric].astype("float64")
    low, high = (float(np.nanmin(table.to_numpy())), float(np.nanmax(table.to_numpy()))) if numeric else (None, None)
    specs = []
    for column in features:
        values = frame[column]
        if column in numeric:
            bounds = (low, high) if ranges == "table" else (float(values.min()), float(values.max()))
            specs.append(FeatureSpec(name=column, dtype=NUMERIC_DTYPE, min=bounds[0], max=bounds[1],
                                     nullable=bool(values.isna().any())))
        else:
            specs.append(FeatureSpec(name=column, dtype=str(values.dtype), min=None, max=None,
                                     nullable=bool(values.isna().any())))
    classes = ordered_classes(frame[label_column])
    labels = frame[label_column].map(class_name)
    reference = reference_statistics(table, labels, classes, bins=bins)
    return ContractSpec(name=name, version=version, label_column=label_column, features=tuple(specs),
                        classes=classes, min_rows=min_rows, max_duplicate_fraction=max_duplicate_fraction,
                        reference=reference)


def build_suite(spec: ContractSpec) -> Any:
    """The GX suite that checks one prepared split (features as prepare writes them, then ``label``
    holding class names)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    e = gx.expectations
    names = list(spec.feature_names)
    classes = list(spec.classes)
    expectations = [
        e.ExpectTableColumnsToMatchOrderedList(column_list=[*names, LABEL]),
        e.ExpectTableRowCountToBeBetween(min_value=spec.min_rows, max_value=spec.max_rows),
    ]
    for feature in spec.features:
        expectations.append(e.ExpectColumnValuesToBeOfType(column=feature.name, type_=feature.dtype))
        if not feature.nullable:
            expectations.append(e.ExpectColumnValuesToNotBeNull(column=feature.name))
        if feature.min is not None or feature.max is not None:
            expectations.append(e.ExpectColumnValuesToBeBetween(column=feature.name, min_value=feature.min,
                                                                max_value=feature.max))
    expectations += [
        e.ExpectColumnValuesToNotBeNull(column=LABEL),
        e.ExpectColumnValuesToBeInSet(column=LABEL, value_set=classes),
        e.ExpectColumnDistinctValuesToContainSet(column=LABEL, value_set=classes),
        e.ExpectCompoundColumnsToBeUnique(column_list=[*names, LABEL], mostly=1 - spec.max_duplicate_fraction,
                                          ignore_row_if="never"),
    ]
    return gx.ExpectationSuite(name=spec.name, expectations=expectations, meta={META_KEY: spec.model_dump(mode="json")})


def render(spec: ContractSpec) -> str:
    """The contract file's text: the suite as GX serializes it, keys sorted so a diff reads well."""
    suite = build_suite(spec).to_json_dict()
    suite.pop("id", None)
    suite["meta"].pop("great_expectations_version", None)
    return json.dumps(suite, indent=1, sort_keys=True) + "\n"


def write_contract(path: str | Path, spec: ContractSpec) -> Path:
    return atomic_write_text(path, render(spec))


def digest_of(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_contract(path: str | Path) -> Contract:
    """Reads and checks a contract file; every problem is one :class:`ContractError` line."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    path = Path(path)
    if not path.is_file():
        raise ContractError(f"data contract {path} not found; write one with `mlops data contract init`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ContractError(f"data contract {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    meta = raw.get("meta", {}).get(META_KEY) if isinstance(raw, dict) else None
    if meta is None:
        raise ContractError(f"data contract {path}: no meta.{META_KEY} (a GX suite without the contract's "
                            "schema; write one with `mlops data contract init`)")
    try:
        spec = ContractSpec.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ContractError(f"data contract {path}: meta.{META_KEY}.{where}: {err['msg']}") from None
    if len(set(spec.classes)) != len(spec.classes) or len(set(spec.feature_names)) != len(spec.feature_names):
        raise ContractError(f"data contract {path}: classes and feature names must each be unique")
    try:
        suite = gx.ExpectationSuite(**{k: v for k, v in raw.items() if k in ("name", "expectations", "meta", "notes")})
    except Exception as exc:  # noqa: BLE001 - GX raises many types for a malformed suite
        raise ContractError(f"data contract {path}: not a valid GX suite ({str(exc).splitlines()[0][:200]})") from None
    ordered = [x for x in suite.expectations if x.expectation_type == "expect_table_columns_to_match_ordered_list"]
    if not ordered or list(ordered[0].column_list) != [*spec.feature_names, LABEL]:
        raise ContractError(f"data contract {path}: its expect_table_columns_to_match_ordered_list disagrees with "
                            f"meta.{META_KEY}.features; rewrite it with `mlops data contract update`")
    return Contract(spec, suite, str(path), digest_of(path))


def signature_difference(champion: dict[str, Any], challenger: dict[str, Any]) -> str | None:
    """The first way two signatures (:meth:`ContractSpec.signature`) differ, in words; None if equal."""
    old = [tuple(x) for x in champion.get("inputs", [])]
    new = [tuple(x) for x in challenger.get("inputs", [])]
    if old != new:
        old_names, new_names = [n for n, _ in old], [n for n, _ in new]
        missing = [n for n in old_names if n not in new_names]
        extra = [n for n in new_names if n not in old_names]
        if missing or extra:
            parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
                    ([f"new {', '.join(extra[:5])}"] if extra else [])
            return "input columns differ: " + "; ".join(parts)
        if old_names != new_names:
            at = next(i for i, (a, b) in enumerate(zip(old_names, new_names)) if a != b)
            return f"input columns reordered: position {at} is {new_names[at]!r}, was {old_names[at]!r}"
        name, was, now = next((a[0], a[1], b[1]) for a, b in zip(old, new) if a != b)
        return f"input column {name!r} dtype {now}, was {was}"
    if list(champion.get("classes", [])) != list(challenger.get("classes", [])):
        return (f"class list {list(challenger.get('classes', []))} differs from "
                f"{list(champion.get('classes', []))}")
    return None


def diff_table(spec: ContractSpec, frame: pd.DataFrame) -> list[str]:
    """How a raw table differs from the contract, one line per column (empty: it conforms).

    This is for a person deciding whether to update the contract; the gate itself is the suite.
    """
    lines: list[str] = []
    label = spec.label_column
    if label not in frame.columns:
        lines.append(f"{label}: label column missing")
    columns = [str(c) for c in frame.columns if c != label]
    expected = list(spec.feature_names)
    missing = [c for c in expected if c not in columns]
    extra = [c for c in columns if c not in expected]
    for column in missing:
        at = expected.index(column)
        renamed = at < len(columns) and columns[at] in extra
        lines.append(f"{column}: missing" + (f" (column {at} is now {columns[at]!r}: renamed?)" if renamed else ""))
    for column in extra:
        lines.append(f"{column}: not in the contract (column {columns.index(column)})")
    common = [c for c in columns if c in expected]
    if not missing and not extra and common != expected:
        at = next(i for i, (a, b) in enumerate(zip(common, expected)) if a != b)
        lines.append(f"{common[at]}: at position {at}, the contract has {expected[at]!r} there (reordered)")
    for feature in spec.features:
        if feature.name not in columns:
            continue
        values = frame[feature.name]
        numeric = is_numeric(values)
        if (feature.dtype == NUMERIC_DTYPE) != numeric or (not numeric and str(values.dtype) != feature.dtype):
            lines.append(f"{feature.name}: dtype {values.dtype}, the contract has {feature.dtype}")
            continue
        nulls = int(values.isna().sum())
        if nulls and not feature.nullable:
            lines.append(f"{feature.name}: {nulls} empty values, the contract allows none")
        if numeric and len(values.dropna()):
            low, high = float(values.min()), float(values.max())
            if feature.min is not None and low < feature.min:
                lines.append(f"{feature.name}: min {low:g} below the contract's {feature.min:g}")
            if feature.max is not None and high > feature.max:
                lines.append(f"{feature.name}: max {high:g} above the contract's {feature.max:g}")
    if label in frame.columns:
        present = set(frame[label].dropna().map(class_name))
        unknown = sorted(present - set(spec.classes))
        absent = [c for c in spec.classes if c not in present]
        if unknown:
            lines.append(f"{label}: labels outside the class list: {', '.join(unknown[:10])}")
        if absent:
            lines.append(f"{label}: classes absent: {', '.join(absent[:10])}")
    return lines
