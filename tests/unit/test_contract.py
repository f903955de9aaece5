"""The data contract: the committed digits suite, every way a dataset version can break it, the label
mapping through its class list, signatures, and `mlops data contract init|diff|update`."""

import json
from pathlib import Path

import pandas as pd
import pytest

from ml.config import load_params
from ml.data.contract import (ContractError, infer_spec, load_contract, render, signature_difference,
                              write_contract, diff_table)
from ml.data.prepare import Schema, load_split, prepare
from ml.errors import DataError, ValidationFailed
from tests.conftest import REPO, small_params, write_params
from tests.datasets import ANIMAL_CASES, animals, digits

DIGITS_CONTRACT = REPO / "gx/expectations/digits.json"


@pytest.fixture
def animal_project(project):
    """A project whose source is the animals table and whose contract was written from it."""
    animals().to_csv(project / "animals.csv", index=False)
    write_contract(project / "gx/expectations/animals.json", infer_spec(animals(), "species", "animals", min_rows=5))
    write_params(project, small_params(data={"source": "animals.csv", "label_column": "species"}))
    return project


ANIMALS_CONTRACT = "gx/expectations/animals.json"


def params_of(project):
    return load_params(project / "params.yaml")


def test_committed_digits_contract_is_what_init_writes_from_digits():
    contract = load_contract(DIGITS_CONTRACT)
    assert contract.spec.classes == tuple(str(i) for i in range(10))
    assert contract.spec.feature_names == tuple(f"pixel_{i}" for i in range(64))
    assert {(f.min, f.max, f.nullable) for f in contract.spec.features} == {(0.0, 16.0, False)}
    assert contract.digest.startswith("sha256:") and len(contract.digest) == 7 + 64
    spec = infer_spec(digits(), "label", "digits", ranges="table", min_rows=100)
    assert render(spec) == DIGITS_CONTRACT.read_text()


@pytest.mark.parametrize("case", list(ANIMAL_CASES))
def test_a_version_that_breaks_the_contract_stops_at_prepare_naming_expectation_and_column(animal_project, case):
    change, fragments = ANIMAL_CASES[case]
    params = params_of(animal_project)
    contract = load_contract(ANIMALS_CONTRACT)
    prepare(params.data, contract)
    before = {p.name: p.read_bytes() for p in (animal_project / "data/processed").iterdir()}
    change(animals()).to_csv(animal_project / "animals.csv", index=False)
    with pytest.raises(ValidationFailed) as err:
        prepare(params.data, contract)
    message = str(err.value)
    assert message.startswith("data validation failed: animals.csv breaks the data contract")
    for fragment in fragments:
        assert fragment in message
    assert {p.name: p.read_bytes() for p in (animal_project / "data/processed").iterdir()} == before


def test_header_only_and_empty_files_say_no_data_rows(animal_project):
    params = params_of(animal_project)
    contract = load_contract(ANIMALS_CONTRACT)
    for text in ("length,weight,age,species\n", ""):
        (animal_project / "animals.csv").write_text(text)
        with pytest.raises(DataError, match=r"^data.source: no data rows in animals.csv$"):
            prepare(params.data, contract)
    assert not (animal_project / "data").exists()


def test_labels_map_through_the_contract_class_list_when_a_class_is_absent(animal_project):
    params = params_of(animal_project)
    contract = load_contract(ANIMALS_CONTRACT)
    animals()[lambda f: f.species != "cat"].to_csv(animal_project / "animals.csv", index=False)
    with pytest.raises(ValidationFailed, match="classes absent: cat"):
        prepare(params.data, contract)
    schema = prepare(params.data, contract, allow_missing_classes=True)
    assert schema.classes == ("cat", "dog", "emu") and Schema.read(params.data.processed_dir) == schema
    _, y = load_split(params.data.processed_dir, "test")
    labels = pd.read_parquet(animal_project / "data/processed/test.parquet")["label"]
    assert set(y) == {1, 2}  # dog stays 1 and emu 2: never re-indexed to 0 and 1
    assert [schema.classes[i] for i in y] == labels.tolist()


def test_digits_labels_keep_their_digit_as_index(project):
    params = load_params(write_params(project, small_params()))
    prepare(params.data, load_contract(DIGITS_CONTRACT))
    _, y = load_split(params.data.processed_dir, "train")
    frame = pd.read_parquet(project / "data/processed/train.parquet")
    assert (y == frame["label"].astype(int).to_numpy()).all()


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw.pop("meta"), "no meta.data_contract"),
    (lambda raw: raw["meta"]["data_contract"].pop("classes"), "meta.data_contract.classes: Field required"),
    (lambda raw: raw["meta"]["data_contract"].update(version=0), "meta.data_contract.version"),
    (lambda raw: raw["expectations"].pop(0), "expect_table_columns_to_match_ordered_list disagrees"),
])
def test_a_malformed_contract_file_is_one_line(tmp_path, mutate, message):
    raw = json.loads(render(infer_spec(animals(), "species", "animals", min_rows=5)))
    ordered = next(i for i, x in enumerate(raw["expectations"])
                   if x["type"] == "expect_table_columns_to_match_ordered_list")
    raw["expectations"].insert(0, raw["expectations"].pop(ordered))
    mutate(raw)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ContractError, match=message) as err:
        load_contract(path)
    assert "\n" not in str(err.value)


def test_missing_and_unreadable_contract(tmp_path):
    with pytest.raises(ContractError, match=r"data contract .*nope.json not found; write one with `mlops data contract init`"):
        load_contract(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ContractError, match="not valid JSON"):
        load_contract(tmp_path / "bad.json")


SIG = {"inputs": [["a", "float64"], ["b", "float64"]], "classes": ["x", "y"]}


@pytest.mark.parametrize("other, difference", [
    (SIG, None),
    ({**SIG, "inputs": [["a", "float64"], ["c", "float64"]]}, "input columns differ: missing b; new c"),
    ({**SIG, "inputs": [["b", "float64"], ["a", "float64"]]}, "input columns reordered: position 0 is 'b', was 'a'"),
    ({**SIG, "inputs": [["a", "float64"], ["b", "string"]]}, "input column 'b' dtype string, was float64"),
    ({**SIG, "classes": ["y", "x"]}, "class list ['y', 'x'] differs from ['x', 'y']"),
    ({**SIG, "classes": ["x"]}, "class list ['x'] differs from ['x', 'y']"),
])
def test_signature_difference(other, difference):
    assert signature_difference(SIG, other) == difference


def test_diff_table_names_each_column():
    spec = infer_spec(animals(), "species", "animals", min_rows=5)
    assert diff_table(spec, animals()) == []
    changed = animals().rename(columns={"weight": "mass"}).assign(length=lambda f: f.length * 100)
    changed = changed[changed.species != "emu"]
    lines = diff_table(spec, changed)
    assert "weight: missing (column 1 is now 'mass': renamed?)" in lines
    assert "mass: not in the contract (column 1)" in lines
    assert any(line.startswith("length: max ") and "above the contract's" in line for line in lines)
    assert "species: classes absent: emu" in lines


def run_cli(*argv):
    from mlops.cli import main

    main(["--params", "params.yaml", *argv[:3], "--contract", ANIMALS_CONTRACT, *argv[3:]])


def test_cli_init_diff_update(animal_project, capsys):
    path = animal_project / "gx/expectations/animals.json"
    path.unlink()
    run_cli("data", "contract", "init", "--min-rows", "5")
    assert "wrote gx/expectations/animals.json from animals.csv: 3 features, classes cat, dog, emu" in capsys.readouterr().out
    first = load_contract(path)
    with pytest.raises(SystemExit) as exists:
        run_cli("data", "contract", "init")
    assert exists.value.code != 0 and "exists" in capsys.readouterr().err
    run_cli("data", "contract", "diff")
    assert "no differences" in capsys.readouterr().out

    wider = pd.concat([animals(), pd.DataFrame({"length": [500.0] * 3, "weight": [5.0] * 3, "age": [3.0] * 3,
                                                "species": ["auk"] * 3})], ignore_index=True)
    wider.to_csv(animal_project / "v2.csv", index=False)
    with pytest.raises(SystemExit) as differs:
        run_cli("data", "contract", "diff", "v2.csv")
    assert differs.value.code == 1
    out = capsys.readouterr().out
    assert "length: max 500 above the contract's" in out and "species: labels outside the class list: auk" in out
    before = path.read_text()
    with pytest.raises(SystemExit):
        run_cli("data", "contract", "update", "v2.csv")  # no terminal to confirm on: left as it was
    assert path.read_text() == before
    run_cli("data", "contract", "update", "v2.csv", "--yes")
    updated = load_contract(path)
    assert updated.spec.version == first.spec.version + 1
    assert updated.spec.classes == ("cat", "dog", "emu", "auk")  # old order kept: the label mapping
    assert updated.spec.features[0].max == 500.0 and updated.digest != first.digest
    animals().to_csv(animal_project / "v3.csv", index=False)
    run_cli("data", "contract", "update", "v3.csv", "--yes")
    assert load_contract(path).spec.features[0].max == 500.0  # an update never narrows a range


def test_lineage_reaches_the_contract_a_version_was_trained_under():
    from lineage.graph import Lineage, Node, add_contract
    from lineage.render import render
    from registry.store import VersionRecord

    tags = {"contract_path": "gx/expectations/digits.json", "contract_version": "2", "contract_digest": "sha256:ab12",
            "contract_artifact": "runs:/r1/contract/digits.json"}
    graph = Lineage()
    version_id = graph.add(Node("version:m/3", "model_version", "m v3"))
    add_contract(graph, VersionRecord("m", "3", "Approved", "r1", "models:/m/3", (), tags), version_id)
    node = graph.nodes["contract:sha256:ab12"]
    assert node.kind == "contract" and node.attrs["artifact"] == "runs:/r1/contract/digits.json"
    assert [(e.source, e.target, e.relation) for e in graph.edges] == [(version_id, node.id, "trained under")]
    assert "data contract gx/expectations/digits.json v2" in render(graph, "text")
    untagged = Lineage()
    add_contract(untagged, VersionRecord("m", "1", "Approved", "r0", "models:/m/1", (), {}), "version:m/1")
    assert untagged.nodes == {}
