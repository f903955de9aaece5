"""Request bodies of the serving endpoint: what a version's signature accepts (:class:`InputSpec`)
and the parsing of ``POST /predict`` bodies against it without pandas (:func:`parse_inputs`).

``{"inputs": [[...], ...]}`` and MLflow's ``instances``, ``dataframe_split`` and ``dataframe_records``
are accepted; named columns are checked against the feature names of the version's data contract
and reordered to them. Anything else is an :class:`InvalidInput` whose message names the key and
what was expected (the endpoint answers it with 422).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from ml.errors import RegistryError

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    loads = orjson.loads
except ImportError:  # orjson is optional: the standard library is slower but equivalent
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=lambda a: a.tolist()).encode()

    loads = json.loads


INPUT_KEYS = ("inputs", "instances", "dataframe_split", "dataframe_records")
_NUMBER_TYPES = {int, float}


class InvalidInput(ValueError):
    """A request body the model's signature does not accept (answered with 422)."""


@dataclass(frozen=True)
class InputSpec:
    """What the signature accepts: ``width`` numbers per row, named by ``columns`` when column-based."""

    width: int
    dtype: str
    columns: tuple[str, ...] | None = None

    @classmethod
    def from_signature(cls, signature: Any, model: str) -> InputSpec:
        schema = signature.inputs if signature is not None else None
        if schema is None:
            raise RegistryError(f"{model}: no input signature; expected a model logged with a signature")
        if schema.is_tensor_spec():
            spec = schema.inputs[0]
            if len(schema.inputs) != 1 or len(spec.shape) != 2 or spec.shape[1] < 1 or spec.type.kind != "f":
                raise RegistryError(f"{model}: input {schema}; expected one floating-point tensor of shape [-1, n]")
            return cls(int(spec.shape[1]), str(spec.type))
        kinds = {c.type.to_numpy().kind for c in schema.inputs}
        if not schema.has_input_names() or not kinds <= set("fiu"):
            raise RegistryError(f"{model}: input columns {schema}; expected named numeric columns")
        return cls(len(schema.inputs), "float32", tuple(schema.input_names()))

    def describe(self) -> str:
        if self.columns:
            return f"rows of {self.width} numbers in column order {self.columns[0]}..{self.columns[-1]}"
        return f"rows of {self.width} numbers (a {self.dtype} tensor of shape [-1, {self.width}])"


def parse_inputs(body: bytes, spec: InputSpec) -> np.ndarray:
    """The request body as a matrix of ``spec.dtype``, shape (rows, spec.width); raises :class:`InvalidInput`."""
    try:
        payload = loads(body)
    except ValueError as exc:
        raise InvalidInput(f"body is not valid JSON ({str(exc).splitlines()[0]}); "
                           f'expected {{"inputs": [...]}} with {spec.describe()}') from None
    keys = [k for k in INPUT_KEYS if k in payload] if isinstance(payload, dict) else []
    if len(keys) != 1:
        got = ", ".join(map(repr, payload)) if isinstance(payload, dict) else f"a JSON {type(payload).__name__}"
        raise InvalidInput(f"expected a JSON object with exactly one of the keys {', '.join(INPUT_KEYS)}; "
                           f"got {got or 'an empty object'}")
    key = keys[0]
    value = payload[key]
    if key == "dataframe_split":
        if not isinstance(value, dict) or "data" not in value:
            raise InvalidInput('dataframe_split: expected an object with "data" (rows) and optional "columns"')
        return _to_matrix(_reorder(value["data"], value.get("columns"), spec, key), spec, key)
    if key == "dataframe_records":
        if not spec.columns:
            raise InvalidInput("dataframe_records: this model takes a tensor without column names; "
                               f'expected {{"inputs": [...]}} with {spec.describe()}')
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise InvalidInput("dataframe_records: expected a list of objects mapping column to value")
        check_columns([c for r in value for c in r], spec, key)
        missing = next((c for r in value for c in spec.columns if c not in r), None)
        if missing is not None:
            raise InvalidInput(f"dataframe_records: column {missing!r} missing in a record; expected {spec.describe()}")
        return _to_matrix([[r[c] for c in spec.columns] for r in value], spec, key)
    if isinstance(value, dict) and spec.columns:  # {"inputs": {"column": [values...]}}
        check_columns(list(value), spec, key)
        columns = [value[c] for c in spec.columns]
        if not all(isinstance(c, list) for c in columns):
            raise InvalidInput(f"{key}: expected each column to be a list of numbers")
        return _to_matrix([list(r) for r in zip(*columns, strict=False)], spec, key)
    return _to_matrix(value, spec, key)


def check_columns(names: list[Any], spec: InputSpec, key: str) -> None:
    """Column names a request gives against the served version's feature names (from its data
    contract or its signature): unknown and missing ones are named in the 422."""
    given = list(dict.fromkeys(names))
    unknown = [str(c) for c in given if c not in spec.columns]
    missing = [c for c in spec.columns if c not in given]

    def named(columns: list[str]) -> str:
        return ("column " if len(columns) == 1 else "columns ") + ", ".join(map(repr, columns[:10]))

    if unknown or missing:
        parts = ([f"unknown {named(unknown)}"] if unknown else []) + ([f"{named(missing)} missing"] if missing else [])
        raise InvalidInput(f"{key}: {'; '.join(parts)}; expected {spec.describe()}")


def _reorder(rows: Any, columns: Any, spec: InputSpec, key: str) -> Any:
    if columns is None:
        return rows
    if not isinstance(columns, list) or not isinstance(rows, list):
        raise InvalidInput(f"{key}: expected \"columns\" and \"data\" to be lists")
    if not spec.columns:
        if len(columns) != spec.width:
            raise InvalidInput(f"{key}: expected {spec.width} columns, got {len(columns)}")
        return rows
    check_columns(columns, spec, key)
    index = {c: i for i, c in enumerate(columns)}
    if list(spec.columns) == columns:
        return rows
    order = [index[c] for c in spec.columns]
    if not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
        raise InvalidInput(f"{key}: expected each row to have {len(columns)} values, one per column")
    return [[r[i] for i in order] for r in rows]


def _to_matrix(rows: Any, spec: InputSpec, key: str) -> np.ndarray:
    if not isinstance(rows, list) or not rows:
        raise InvalidInput(f"{key}: expected a non-empty list of {spec.describe()}")
    if not all(type(r) is list for r in rows):
        raise InvalidInput(f"{key}: expected a list of rows (a 2-D array), each a list of {spec.width} numbers")
    bad = next((n for n in map(len, rows) if n != spec.width), None)
    if bad is not None:
        raise InvalidInput(f"{key}: expected {spec.describe()}, got a row of {bad}")
    types = set(map(type, chain.from_iterable(rows)))
    if not types <= _NUMBER_TYPES:
        odd = sorted(t.__name__ if t is not type(None) else "null" for t in types - _NUMBER_TYPES)
        raise InvalidInput(f"{key}: expected numbers, got {', '.join(odd)}")
    try:
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            matrix = np.array(rows, dtype=spec.dtype)
    except OverflowError:
        matrix = np.full((1, 1), np.inf, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise InvalidInput(f"{key}: expected finite numbers within {spec.dtype} range")
    return matrix

