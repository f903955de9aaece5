"""The endpoint's input contract: request bodies checked against a model signature, without a server."""

import json

import numpy as np
import pytest

from deploy.inputs import InputSpec, InvalidInput, parse_inputs
from deploy.model_loader import public_uri
from ml.errors import RegistryError

TENSOR = InputSpec(width=3, dtype="float32")
COLUMNS = InputSpec(width=3, dtype="float32", columns=("a", "b", "c"))


def parse(payload, spec=TENSOR):
    return parse_inputs(json.dumps(payload).encode(), spec)


@pytest.mark.parametrize("payload, spec", [
    ({"inputs": [[1, 2, 3], [4, 5, 6]]}, TENSOR),
    ({"instances": [[1, 2, 3], [4.0, 5.0, 6.0]]}, TENSOR),
    ({"dataframe_split": {"data": [[1, 2, 3], [4, 5, 6]]}}, TENSOR),
    ({"dataframe_split": {"columns": ["x", "y", "z"], "data": [[1, 2, 3], [4, 5, 6]]}}, TENSOR),
    ({"inputs": [[1, 2, 3], [4, 5, 6]]}, COLUMNS),
    ({"inputs": {"c": [3, 6], "a": [1, 4], "b": [2, 5]}}, COLUMNS),
    ({"dataframe_split": {"columns": ["c", "a", "b"], "data": [[3, 1, 2], [6, 4, 5]]}}, COLUMNS),
    ({"dataframe_records": [{"b": 2, "a": 1, "c": 3}, {"c": 6, "b": 5, "a": 4}]}, COLUMNS),
])
def test_accepted_forms_give_the_same_matrix(payload, spec):
    x = parse(payload, spec)
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("payload, spec, message", [
    ({"inputs": [[1, 2]]}, TENSOR,
     "inputs: expected rows of 3 numbers (a float32 tensor of shape [-1, 3]), got a row of 2"),
    ({"inputs": [1, 2, 3]}, TENSOR, "inputs: expected a list of rows (a 2-D array), each a list of 3 numbers"),
    ({"inputs": {"a": [1]}}, TENSOR, "inputs: expected a non-empty list of rows of 3 numbers"),
    ({"inputs": [[1, "2", None]]}, TENSOR, "inputs: expected numbers, got null, str"),
    ({"inputs": [[1, 2, 1e39]]}, TENSOR, "inputs: expected finite numbers within float32 range"),
    ({"inputs": [[1, 2, 3]], "instances": []}, TENSOR, "expected a JSON object with exactly one of the keys"),
    ({}, TENSOR, "got an empty object"),
    ({"dataframe_split": [[1, 2, 3]]}, TENSOR, 'dataframe_split: expected an object with "data" (rows)'),
    ({"dataframe_records": [{"a": 1, "b": 2}]}, COLUMNS, "dataframe_records: column 'c' missing"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}, COLUMNS, "dataframe_split: column 'c' missing"),
    ({"inputs": {"a": [1], "b": [2]}}, COLUMNS, "inputs: column 'c' missing"),
])
def test_rejections_name_what_was_expected(payload, spec, message):
    with pytest.raises(InvalidInput) as caught:
        parse(payload, spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_invalid_json_is_rejected_in_one_line():
    with pytest.raises(InvalidInput, match=r"^body is not valid JSON \(.*\); expected \{\"inputs\""):
        parse_inputs(b'{"inputs": [[1, 2, NaN]]}', TENSOR)


def test_spec_from_signatures():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    tensor = ModelSignature(Schema([TensorSpec(np.dtype("float32"), (-1, 64))]))
    assert InputSpec.from_signature(tensor, "m") == InputSpec(64, "float32")
    columns = ModelSignature(Schema([ColSpec("double", "a"), ColSpec("long", "b")]))
    assert InputSpec.from_signature(columns, "m") == InputSpec(2, "float32", ("a", "b"))
    with pytest.raises(RegistryError, match="m: no input signature"):
        InputSpec.from_signature(None, "m")
    with pytest.raises(RegistryError, match="expected named numeric columns"):
        InputSpec.from_signature(ModelSignature(Schema([ColSpec("string", "s")])), "m")


@pytest.mark.parametrize("uri, public", [
    ("http://user:secret@mlflow.example:5000", "http://mlflow.example:5000"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
])
def test_public_uri_drops_credentials(uri, public):
    assert public_uri(uri) == public


def test_tensor_signatures_other_than_one_float_matrix_are_refused():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    f32 = np.dtype("float32")
    for schema in (Schema([TensorSpec(np.dtype("int64"), (-1, 4))]), Schema([TensorSpec(f32, (-1, 4, 4))]),
                   Schema([TensorSpec(f32, (-1, 4), "a"), TensorSpec(f32, (-1, 4), "b")])):
        with pytest.raises(RegistryError, match="expected one floating-point tensor of shape"):
            InputSpec.from_signature(ModelSignature(schema), "m")
