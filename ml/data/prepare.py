"""prepare: materialize the raw dataset, then split it stratified and seeded into Parquet files.

prepare keeps each feature column as read (numbers as float64, anything else as strings) and each
label as its class name, and runs the contract's suite over the whole table before it writes
anything, so a version that breaks the contract never replaces the prepared data; the gate
(ml.data.validate) then checks each split and drift. Label indices come from the contract's class list, in ``schema.json`` and
:func:`load_split`, never from the classes a dataset version happens to hold.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.config import DataConfig
from ml.data.contract import LABEL, Contract, class_name, is_numeric
from ml.errors import DataError
from ml.io import atomic_write_json, read_json, replace_dir

SPLITS = ("train", "val", "test")
SKLEARN_PREFIX = "sklearn:"
SKLEARN_DATASETS = ("digits",)


@dataclass(frozen=True)
class Schema:
    """What models read from the prepared data: the contract's feature columns in order, its class
    list (label index ``i`` is ``classes[i]``), the source, and the contract (path, digest, name, version)."""

    features: tuple[str, ...]
    classes: tuple[str, ...]
    source: str
    contract: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "classes": list(self.classes), "source": self.source,
                "label": LABEL, "contract": self.contract}

    @classmethod
    def read(cls, processed_dir: str | Path) -> Schema:
        raw = read_json(Path(processed_dir) / "schema.json")
        return cls(tuple(raw["features"]), tuple(raw["classes"]), raw["source"], raw.get("contract"))


def load_sklearn(name: str) -> pd.DataFrame:
    """A dataset bundled with scikit-learn (no download) as features + ``label``."""
    if name not in SKLEARN_DATASETS:
        raise DataError(f"data.source: unknown scikit-learn dataset {name!r}; expected one of "
                        + ", ".join(f"sklearn:{n}" for n in SKLEARN_DATASETS))
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame(bunch.data, columns=[f"pixel_{i}" for i in range(bunch.data.shape[1])])
    frame[LABEL] = bunch.target.astype("int64")
    return frame


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file, with a one-line error when it is missing or unreadable."""
    if not path.is_file():
        raise DataError(f"data.source: raw file {path} not found")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"data.source: {path} has suffix {suffix!r}; expected .csv or .parquet")
    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"data.source: no data rows in {path}") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"data.source: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if frame.empty:
        raise DataError(f"data.source: no data rows in {path}")
    return frame


def to_training_frame(frame: pd.DataFrame, label_column: str, source: str) -> pd.DataFrame:
    """The raw table as the splits keep it: the feature columns in their order (numbers as float64,
    anything else as strings), then ``label`` holding each row's class name."""
    if frame.empty:
        raise DataError(f"data.source: no data rows in {source}")
    if label_column not in frame.columns:
        raise DataError(f"{source}: label column {label_column!r} not found; columns are "
                        + ", ".join(map(str, frame.columns[:10])) + ("..." if len(frame.columns) > 10 else ""))
    features = [c for c in frame.columns if c != label_column]
    if not features:
        raise DataError(f"{source}: no feature columns besides the label {label_column!r}")
    if LABEL in map(str, features):
        raise DataError(f"{source}: a feature column is named {LABEL!r}; rename it (the splits keep the "
                        f"label under that name)")
    labels = frame[label_column]
    if labels.isna().any():
        raise DataError(f"{source}: label column {label_column!r} has {int(labels.isna().sum())} empty values")
    out = pd.DataFrame({str(c): frame[c].astype("float64") if is_numeric(frame[c]) else frame[c].astype("string")
                        for c in features}, index=frame.index)
    out[LABEL] = labels.map(class_name).astype("string")
    return out


def split(frame: pd.DataFrame, test_size: float, val_size: float, seed: int) -> dict[str, pd.DataFrame]:
    """Seeded train/val/test split, stratified by label when every label has the 3 rows that needs
    (otherwise plain: the gate then reports the rare labels); row order inside each split is deterministic."""
    from sklearn.model_selection import train_test_split

    stratified = bool((frame[LABEL].value_counts() >= 3).all())
    try:
        rest, test = train_test_split(frame, test_size=test_size, random_state=seed,
                                      stratify=frame[LABEL] if stratified else None)
        train, val = train_test_split(rest, test_size=val_size / (1 - test_size), random_state=seed,
                                      stratify=rest[LABEL] if stratified else None)
    except ValueError as exc:
        raise DataError(f"data: cannot split {len(frame)} rows stratified: {exc}") from None
    return {"train": train.reset_index(drop=True), "val": val.reset_index(drop=True),
            "test": test.reset_index(drop=True)}


def read_source(cfg: DataConfig) -> tuple[pd.DataFrame, str, Callable[[Path], None]]:
    """Reads the raw source; returns the table, its file name in ``raw_dir`` and a writer for it."""
    if cfg.source.startswith(SKLEARN_PREFIX):
        name = cfg.source[len(SKLEARN_PREFIX):]
        frame = load_sklearn(name)
        return frame, f"{name}.csv", lambda tmp: frame.to_csv(tmp / f"{name}.csv", index=False)
    path = Path(cfg.source)
    return read_table(path), path.name, lambda tmp: shutil.copyfile(path, tmp / path.name)


def prepare(cfg: DataConfig, contract: Contract, allow_missing_classes: bool = False) -> Schema:
    """The prepare stage: raw source -> ``raw_dir`` -> ``processed_dir/{train,val,test}.parquet``,
    with ``schema.json`` naming the contract whose features and class list the splits are read by.

    Everything is read and checked against the contract before anything is written, and each
    directory is swapped in whole, so bad input leaves the previous outputs as they were.
    """
    from ml.data.validate import check_dataset

    frame, raw_name, write_raw = read_source(cfg)
    label = LABEL if cfg.source.startswith(SKLEARN_PREFIX) else cfg.label_column
    table = to_training_frame(frame, label, cfg.source)
    check_dataset(table, contract, cfg.source, allow_missing_classes=allow_missing_classes)
    parts = split(table, cfg.test_size, cfg.val_size, cfg.seed)
    schema = Schema(contract.spec.feature_names, contract.spec.classes, cfg.source, contract.reference())

    def write_processed(tmp: Path) -> None:
        for name, part in parts.items():
            part.to_parquet(tmp / f"{name}.parquet", index=False)
        atomic_write_json(tmp / "schema.json", {**schema.to_dict(), "raw": f"{cfg.raw_dir}/{raw_name}",
                                                "columns": list(table.columns[:-1]),
                                                "signature": contract.spec.signature(),
                                                "rows": {k: len(v) for k, v in parts.items()}})

    replace_dir(cfg.raw_dir, write_raw)
    replace_dir(cfg.processed_dir, write_processed)
    return schema


def load_split(processed_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, the contract's columns in order) and labels (int64 indices into the
    contract's class list) of one split."""
    schema = Schema.read(processed_dir)
    frame = pd.read_parquet(Path(processed_dir) / f"{name}.parquet")
    return split_arrays(frame, schema.features, schema.classes, f"{processed_dir}/{name}.parquet")


def split_arrays(frame: pd.DataFrame, features: tuple[str, ...], classes: tuple[str, ...],
                 where: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's features and label indices under a contract's schema; a split that does not fit it
    (the gate would have stopped it) is a one-line DataError."""
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: columns {', '.join(missing[:5])} of the contract are missing; "
                        "run the validate stage to see how the data differs")
    labels = label_indices(frame[LABEL], classes, where)
    try:
        x = frame[list(features)].to_numpy(dtype=np.float32, copy=True)
    except (TypeError, ValueError):
        raise DataError(f"{where}: non-numeric feature values; run the validate stage to see where") from None
    return x, labels


def table_arrays(table: Any, features: tuple[str, ...], classes: tuple[str, ...],
                 where: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_arrays` for a pyarrow table: each feature column is copied straight into one
    float32 array (a pandas frame of thousands of columns costs ten times the read itself)."""
    position = {name: i for i, name in enumerate(table.column_names)}   # one lookup a column, not a scan
    missing = [c for c in (*features, LABEL) if c not in position]
    if missing:
        raise DataError(f"{where}: columns {', '.join(missing[:5])} of the contract are missing; "
                        "run the validate stage to see how the data differs")
    labels = label_indices(table.column(position[LABEL]).to_pandas(), classes, where)
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    try:
        for j, name in enumerate(features):
            x[:, j] = table.column(position[name]).to_numpy()
    except (TypeError, ValueError):
        raise DataError(f"{where}: non-numeric feature values; run the validate stage to see where") from None
    return x, labels


def label_indices(labels: pd.Series, classes: tuple[str, ...], where: str) -> np.ndarray:
    """Each label's index in the contract's class list; a label outside it is a one-line DataError."""
    index = {c: i for i, c in enumerate(classes)}
    mapped = labels.map(class_name).map(index)
    if mapped.isna().any():
        unknown = sorted(set(labels.map(class_name)) - set(index))
        raise DataError(f"{where}: labels {unknown[:5]} are outside the contract's class list")
    return mapped.to_numpy(dtype=np.int64, copy=True)

