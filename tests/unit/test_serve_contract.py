"""The endpoint speaks the data contract: named columns are checked against the served version's
feature names, unknown and missing ones named in one line."""

import json

import numpy as np
import pytest

from deploy.inputs import InputSpec, InvalidInput, parse_inputs

FEATURES = InputSpec(width=3, dtype="float32", columns=("length", "weight", "age"))


def parse(payload):
    return parse_inputs(json.dumps(payload).encode(), FEATURES)


@pytest.mark.parametrize("payload, message", [
    ({"dataframe_split": {"columns": ["length", "mass", "age"], "data": [[1, 2, 3]]}},
     "dataframe_split: unknown column 'mass'; column 'weight' missing; expected rows of 3 numbers"),
    ({"dataframe_split": {"columns": ["length", "weight", "age", "colour"], "data": [[1, 2, 3, 4]]}},
     "dataframe_split: unknown column 'colour'; expected"),
    ({"dataframe_records": [{"length": 1, "age": 3}]}, "dataframe_records: column 'weight' missing"),
    ({"dataframe_records": [{"length": 1, "weight": 2, "age": 3, "x": 0, "y": 0}]},
     "dataframe_records: unknown columns 'x', 'y'; expected"),
    ({"inputs": {"length": [1], "mass": [2]}}, "inputs: unknown column 'mass'; columns 'weight', 'age' missing"),
])
def test_named_columns_must_be_the_contract_features(payload, message):
    with pytest.raises(InvalidInput) as caught:
        parse(payload)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_reordered_named_columns_are_put_in_contract_order():
    x = parse({"dataframe_split": {"columns": ["age", "length", "weight"], "data": [[3, 1, 2]]}})
    np.testing.assert_array_equal(x, [[1, 2, 3]])
