"""prepare: materialize the raw dataset, then split it stratified and seeded into Parquet files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.config import DataConfig
from ml.errors import DataError
from ml.io import atomic_write_json, read_json, replace_dir

LABEL = "label"
SPLITS = ("train", "val", "test")
SKLEARN_PREFIX = "sklearn:"
SKLEARN_DATASETS = ("digits",)


@dataclass(frozen=True)
class Schema:
    """What prepare wrote: feature columns in order, and the original class of each label index."""

    features: tuple[str, ...]
    classes: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "classes": list(self.classes), "source": self.source,
                "label": LABEL}

    @classmethod
    def read(cls, processed_dir: str | Path) -> Schema:
        raw = read_json(Path(processed_dir) / "schema.json")
        return cls(tuple(raw["features"]), tuple(raw["classes"]), raw["source"])


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
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"data.source: cannot read {path}: {str(exc).splitlines()[0]}") from None
    raise DataError(f"data.source: {path} has suffix {suffix!r}; expected .csv or .parquet")


def to_training_frame(frame: pd.DataFrame, label_column: str, source: str) -> tuple[pd.DataFrame, Schema]:
    """Checks a raw table and returns float64 features + an int64 ``label`` column (0..n-1)."""
    if label_column not in frame.columns:
        raise DataError(f"{source}: label column {label_column!r} not found; columns are "
                        + ", ".join(map(str, frame.columns[:10])) + ("..." if len(frame.columns) > 10 else ""))
    features = [c for c in frame.columns if c != label_column]
    if not features:
        raise DataError(f"{source}: no feature columns besides the label {label_column!r}")
    for column in features:
        if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
            raise DataError(f"{source}: feature column {column!r} is not numeric (dtype {frame[column].dtype}); "
                            "expected numbers in every feature column")
    labels = frame[label_column]
    if labels.isna().any():
        raise DataError(f"{source}: label column {label_column!r} has {int(labels.isna().sum())} empty values")
    classes = sorted(labels.unique(), key=lambda v: (str(type(v)), v))
    index = {c: i for i, c in enumerate(classes)}
    out = frame[features].astype("float64")
    out.columns = [str(c) for c in features]
    out[LABEL] = labels.map(index).astype("int64")
    schema = Schema(tuple(out.columns[:-1]), tuple(str(c) for c in classes), source)
    return out, schema


def split(frame: pd.DataFrame, test_size: float, val_size: float, seed: int) -> dict[str, pd.DataFrame]:
    """Stratified, seeded train/val/test split; row order inside each split is deterministic."""
    from sklearn.model_selection import train_test_split

    counts = frame[LABEL].value_counts()
    if (counts < 3).any():
        rare = counts[counts < 3].index.tolist()
        raise DataError(f"data.source: classes {rare} have fewer than 3 rows; a stratified split needs 3")
    try:
        rest, test = train_test_split(frame, test_size=test_size, stratify=frame[LABEL], random_state=seed)
        train, val = train_test_split(rest, test_size=val_size / (1 - test_size), stratify=rest[LABEL],
                                      random_state=seed)
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


def prepare(cfg: DataConfig) -> Schema:
    """The prepare stage: raw source -> ``raw_dir`` -> ``processed_dir/{train,val,test}.parquet``.

    Everything is read and checked before anything is written, and each directory is swapped in
    whole, so bad input leaves the previous outputs as they were.
    """
    frame, raw_name, write_raw = read_source(cfg)
    label = LABEL if cfg.source.startswith(SKLEARN_PREFIX) else cfg.label_column
    table, schema = to_training_frame(frame, label, cfg.source)
    parts = split(table, cfg.test_size, cfg.val_size, cfg.seed)

    def write_processed(tmp: Path) -> None:
        for name, part in parts.items():
            part.to_parquet(tmp / f"{name}.parquet", index=False)
        atomic_write_json(tmp / "schema.json", {**schema.to_dict(), "raw": f"{cfg.raw_dir}/{raw_name}",
                                                "rows": {k: len(v) for k, v in parts.items()}})

    replace_dir(cfg.raw_dir, write_raw)
    replace_dir(cfg.processed_dir, write_processed)
    return schema


def load_split(processed_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and labels (int64) of one split."""
    frame = pd.read_parquet(Path(processed_dir) / f"{name}.parquet")
    x = frame.drop(columns=[LABEL]).to_numpy(dtype=np.float32, copy=True)
    y = frame[LABEL].to_numpy(dtype=np.int64, copy=True)
    return x, y

