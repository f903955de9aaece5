"""Dataset versions for the contract tests: a small table with named columns, digits, and the ways a
new version can break a contract, each with the words the error must contain."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

ANIMAL_FEATURES = ("length", "weight", "age")


def animals(rows_per_class: int = 60, seed: int = 0) -> pd.DataFrame:
    """Three numeric features whose distributions depend on the class, and a ``species`` label."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, species in enumerate(("cat", "dog", "emu")):
        parts.append(pd.DataFrame({"length": rng.normal(40 + 20 * i, 5, rows_per_class).round(2),
                                   "weight": rng.normal(4 + 10 * i, 1, rows_per_class).round(2),
                                   "age": rng.integers(1, 15, rows_per_class).astype(float),
                                   "species": species}))
    return pd.concat(parts, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def digits() -> pd.DataFrame:
    from ml.data.prepare import load_sklearn

    return load_sklearn("digits")


def _with_strings(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    out = frame.copy()
    out[column] = out[column].astype(object)
    out.loc[:4, column] = "heavy"
    return out


def _with_nulls(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    out = frame.copy()
    out.loc[:4, column] = np.nan
    return out


def _times_100(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    out = frame.copy()
    out[column] = out[column] * 100
    return out


def _reordered(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    columns = [c for c in frame.columns if c != label]
    columns[0], columns[1] = columns[1], columns[0]
    return frame[[*columns, label]]


def _unknown_label(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    out = frame.copy()
    out[label] = out[label].astype(object)
    out.loc[:2, label] = "yak"
    return out


def _duplicates_only(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    firsts = frame.groupby(label, sort=False).head(1)
    return pd.concat([firsts] * 40, ignore_index=True)


# name -> (change of the animals table with label column ``species``, what the error must say)
ANIMAL_CASES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], tuple[str, ...]]] = {
    "renamed column": (lambda f: f.rename(columns={"weight": "mass"}),
                       ("expect_table_columns_to_match_ordered_list", "missing weight", "unexpected mass")),
    "missing column": (lambda f: f.drop(columns=["age"]),
                       ("expect_table_columns_to_match_ordered_list", "missing age")),
    "extra column": (lambda f: f.assign(colour=1.0)[["length", "weight", "age", "colour", "species"]],
                     ("expect_table_columns_to_match_ordered_list", "unexpected colour")),
    "reordered columns": (lambda f: _reordered(f, "species"),
                          ("expect_table_columns_to_match_ordered_list", "position 0 is weight, expected length")),
    "strings in a numeric column": (lambda f: _with_strings(f, "weight"),
                                    ("dataset.weight: expect_column_values_to_be_of_type",)),
    "nulls": (lambda f: _with_nulls(f, "age"), ("dataset.age: expect_column_values_to_not_be_null", "5 of")),
    "values x100": (lambda f: _times_100(f, "length"), ("dataset.length: expect_column_values_to_be_between",)),
    "label outside the class list": (lambda f: _unknown_label(f, "species"),
                                     ("dataset.label: expect_column_values_to_be_in_set", "'yak'")),
    "class absent": (lambda f: f[f.species != "emu"],
                     ("dataset.label: expect_column_distinct_values_to_contain_set", "classes absent: emu")),
    "single class": (lambda f: f[f.species == "cat"],
                     ("expect_column_distinct_values_to_contain_set", "classes absent: dog, emu")),
    "duplicated rows only": (lambda f: _duplicates_only(f, "species"),
                             ("expect_compound_columns_to_be_unique",)),
}
