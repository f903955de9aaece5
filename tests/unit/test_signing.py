"""Signed approvals: keys, keyring, what verifies and what does not, on the embedded SQLite store."""

import json
import os
import stat
from dataclasses import replace

import pytest

from ml.errors import RegistryError
from registry import signing
from registry.signing import ApprovalRecord, Keyring, directory_digest, sign, verify_tags

MODEL = "m"


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MLOPS_APPROVAL_KEYRING", raising=False)
    return tmp_path / "config"


def record(version="1", digest="sha256:aa", decision="Approved", approver="bob", self_approval=False, key_id=""):
    return ApprovalRecord(MODEL, version, digest, decision, approver, "2026-01-02T00:00:00+00:00", "ok",
                          self_approval, "local user", key_id)


def signed_tags(key, rec, status=None):
    rec = replace(rec, key_id=signing.signer_key_id(key))
    return {"approval_status": status or rec.decision, signing.SIGNATURE_TAG: sign(rec, key)}


def test_the_key_is_created_on_first_use_private_to_the_user_and_in_the_keyring(config):
    key = signing.load_private_key()
    path = config / signing.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    keyring = Keyring.load()
    assert [k.key_id for k in keyring.keys] == [signing.signer_key_id(key)]
    assert signing.signer_key_id(signing.load_private_key()) == signing.signer_key_id(key)  # the same key again


def test_a_key_readable_by_others_is_refused(config):
    signing.load_private_key()
    os.chmod(config / signing.KEY_FILE, 0o644)
    with pytest.raises(RegistryError, match=r"mode 0644 lets other users read it; expected 0600"):
        signing.load_private_key()


def test_a_valid_signature_verifies_and_names_the_signer(config):
    key = signing.load_private_key()
    verdict = verify_tags(MODEL, "1", signed_tags(key, record()), Keyring.load(), weights_digest="sha256:aa",
                          author="alice")
    assert verdict.approved and verdict.status == "Approved" and verdict.why == ""
    assert verdict.line().startswith(f"signed by bob (local user, key {signing.signer_key_id(key)}) at ")


@pytest.mark.parametrize("tamper, why", [
    (lambda tags, key: {"approval_status": "Approved"}, "approval_status says Approved but no signed decision"),
    (lambda tags, key: {**tags, signing.SIGNATURE_TAG: "{}"}, "is not a signed approval record"),
    # another version's record, copied whole
    (lambda tags, key: signed_tags(key, record(version="2")), "the signed record is for m v2, not this version"),
    # the payload edited after signing (approver swapped)
    (lambda tags, key: {**tags, signing.SIGNATURE_TAG: tags[signing.SIGNATURE_TAG].replace('\\"bob\\"', '\\"eve\\"')},
     "the signature does not verify"),
    # signed by a key the keyring does not hold
    (lambda tags, key: signed_tags(__import__("cryptography.hazmat.primitives.asymmetric.ed25519", fromlist=["x"])
                                   .Ed25519PrivateKey.generate(), record()), "which keyring .* does not hold"),
    # a valid signature over other weights
    (lambda tags, key: signed_tags(key, record(digest="sha256:bb")), "the weights' digest sha256:aa differs"),
    # the run's author approving without a signed override
    (lambda tags, key: signed_tags(key, record(approver="alice")), "approver 'alice' authored the source run"),
    # a signed rejection with the status tag edited to Approved
    (lambda tags, key: signed_tags(key, record(decision="Rejected"), status="Approved"),
     "approval_status says Approved but the signed decision is Rejected"),
])
def test_forgeries_and_copies_do_not_verify(config, tamper, why):
    key = signing.load_private_key()
    tags = tamper(signed_tags(key, record()), key)
    verdict = verify_tags(MODEL, "1", tags, Keyring.load(), weights_digest="sha256:aa", author="alice")
    assert not verdict.approved
    assert __import__("re").search(why, verdict.why), verdict.why


def test_a_signed_self_approval_override_verifies(config):
    key = signing.load_private_key()
    tags = signed_tags(key, record(approver="alice", self_approval=True))
    assert verify_tags(MODEL, "1", tags, Keyring.load(), author="alice").approved


def test_rotation_keeps_old_public_keys_unless_revoked(config):
    key = signing.load_private_key()
    old_tags = signed_tags(key, record())
    old, new = signing.rotate_key()
    assert old == signing.signer_key_id(key) and new != old
    keyring = Keyring.load()
    assert [(k.key_id, bool(k.retired)) for k in keyring.keys] == [(old, True), (new, False)]
    assert verify_tags(MODEL, "1", old_tags, keyring).approved  # old approvals still verify
    assert signing.signer_key_id(signing.load_private_key()) == new
    stolen_tags = signed_tags(signing.load_private_key(), record())
    assert signing.rotate_key(revoke_old=True)[0] == new
    assert "does not hold" in verify_tags(MODEL, "1", stolen_tags, Keyring.load()).why
    assert verify_tags(MODEL, "1", old_tags, Keyring.load()).approved  # only the replaced key was revoked


def test_a_lost_key_is_replaced_by_rotation_and_can_be_revoked_by_id(config, capsys):
    from mlops.cli import main

    lost = signing.signer_key_id(signing.load_private_key())
    tags = signed_tags(signing.load_private_key(), record())
    (config / signing.KEY_FILE).unlink()
    old, new = signing.rotate_key()
    assert old is None and [k.key_id for k in Keyring.load().keys] == [lost, new]
    assert verify_tags(MODEL, "1", tags, Keyring.load()).approved  # the lost key's approvals still verify
    main(["keys", "revoke", lost])
    assert [k.key_id for k in Keyring.load().keys] == [new]
    assert "does not hold" in verify_tags(MODEL, "1", tags, Keyring.load()).why
    with pytest.raises(SystemExit):
        main(["keys", "revoke", lost])
    assert capsys.readouterr().err.strip() == f"error: key {lost}: not in keyring {Keyring.load().path} (it holds {new})"


def test_rotation_leaves_other_approvers_keys_alone(config):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keyring = Keyring.load()
    other = keyring.add(signing._public_raw(Ed25519PrivateKey.generate()), comment="carol@elsewhere")
    keyring.save()
    signing.load_private_key()
    signing.rotate_key(revoke_old=True)
    assert [(k.key_id == other.key_id, k.retired) for k in Keyring.load().keys][0] == (True, None)


def test_a_broken_keyring_is_one_line(config, tmp_path):
    bad = tmp_path / "keyring.json"
    bad.write_text("[1, 2]")
    with pytest.raises(RegistryError, match=rf"^keyring {bad}: expected JSON"):
        Keyring.load(bad)


def test_the_digest_covers_every_file_and_its_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"123")
    first = directory_digest(tmp_path)
    assert first.startswith("sha256:") and directory_digest(tmp_path) == first
    (tmp_path / "a" / "w.bin").write_bytes(b"124")
    assert directory_digest(tmp_path) != first
    (tmp_path / "a" / "w.bin").rename(tmp_path / "a" / "v.bin")
    assert directory_digest(tmp_path) not in (first,)
    with pytest.raises(RegistryError, match="no model files"):
        directory_digest(tmp_path / "a" / "missing")


# -- on the embedded store ------------------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path, config, empty_store):
    """Three versions of "m" with their own weights, from runs alice authored; v1 approved and champion."""
    import shutil

    from mlflow import MlflowClient

    from registry import actions, store

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("signing", artifact_location=(tmp_path / "artifacts").as_uri())
    for k in range(3):
        run = client.create_run(exp, tags={"mlflow.user": "alice"})
        (tmp_path / "weights.bin").write_bytes(bytes([k]) * 64)
        client.log_artifact(run.info.run_id, str(tmp_path / "weights.bin"), "model")
        store.register_version(client, MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id, {})
    actions.approve_version(uri, MODEL, "1", "baseline", approver="bob")
    actions.promote_version(uri, MODEL, "1")
    return uri, client


def hand_edit(client, version="2"):
    """What an EDIT user can do in the MLflow UI: the status tag and the champion alias."""
    client.set_model_version_tag(MODEL, version, "approval_status", "Approved")
    client.set_registered_model_alias(MODEL, "champion", version)


def test_approval_signs_the_weights_and_records_the_signer(registry):
    from registry import store

    _, client = registry
    record = store.get_version(client, MODEL, "1")
    verdict = store.verify_version(client, record)
    assert verdict.approved and verdict.record.approver == "bob"
    assert verdict.record.weights_digest == store.weights_digest(client, MODEL, "1")
    (event,) = record.history
    assert event["key_id"] == verdict.record.key_id and event["weights_digest"] == verdict.record.weights_digest


def test_list_and_show_report_hand_edits(registry, capsys):
    from mlops.cli import main

    uri, client = registry
    hand_edit(client)
    client.set_model_version_tag(MODEL, "3", signing.SIGNATURE_TAG,
                                 client.get_model_version(MODEL, "1").tags[signing.SIGNATURE_TAG])
    client.set_model_version_tag(MODEL, "3", "approval_status", "Approved")
    capsys.readouterr()
    main(["--tracking-uri", uri, "models", "list", MODEL])
    assert capsys.readouterr().out.splitlines() == [
        "m v1: Approved  accuracy=?",
        "m v2 [champion]: Approved  accuracy=?  UNVERIFIED: approval_status says Approved but no signed decision exists",
        "m v3: Approved  accuracy=?  UNVERIFIED: the signed record is for m v1, not this version",
        "m@champion -> v2: champion set outside the gate: approval_status says Approved but no signed decision exists",
    ]
    main(["--tracking-uri", uri, "models", "show", MODEL, "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "  approval: UNVERIFIED: approval_status says Approved but no signed decision exists",
        "  m@champion -> v2: champion set outside the gate: approval_status says Approved but no signed decision exists"]
    main(["--tracking-uri", uri, "models", "show", MODEL, "1", "--json"])
    verification = json.loads(capsys.readouterr().out)["verification"]
    assert verification["approved"] and verification["signed_by"] == "bob"


def test_approve_never_adopts_a_hand_edited_tag(registry):
    from registry import actions, store

    uri, client = registry
    hand_edit(client)
    with pytest.raises(RegistryError, match="approver 'alice' is the author"):
        actions.approve_version(uri, MODEL, "2", "mine", approver="alice")  # separation of duties still holds
    record = actions.approve_version(uri, MODEL, "2", "reviewed", approver="carol")
    assert [(e["from_status"], e["to_status"], e["by"]) for e in record.history] == [
        ("PendingManualApproval", "Approved", "carol")]
    assert store.verify_version(client, record).approved


def test_weights_replaced_after_approval_do_not_verify(registry, tmp_path):
    from registry import store

    _, client = registry
    run_id = client.get_model_version(MODEL, "1").run_id
    (weights,) = (tmp_path / "artifacts").glob(f"{run_id}/**/model/weights.bin")
    weights.write_bytes(b"other weights")
    verdict = store.verify_version(client, store.get_version(client, MODEL, "1"))
    assert not verdict.approved and "the weights' digest" in verdict.why


def test_revert_moves_an_unverified_alias_back_and_records_it(registry):
    from registry import gate, store

    uri, client = registry
    assert gate.revert_unverified_alias(client, MODEL, "flow") is None  # v1 verifies: nothing to do
    hand_edit(client)
    entry = gate.revert_unverified_alias(client, MODEL, "flow")
    assert (entry["version"], entry["previous"], entry["by"]) == ("1", "2", "flow")
    assert entry["reverted"].startswith("v2 was set outside the gate: approval_status says Approved")
    assert store.champion(client, MODEL).version == "1"
    assert store.alias_history(client, MODEL)[-1] == entry
    client.set_registered_model_alias(MODEL, "champion", "3")
    client.delete_model_version_tag(MODEL, "1", signing.SIGNATURE_TAG)  # no verified holder left
    entry = gate.revert_unverified_alias(client, MODEL, "flow")
    assert entry["version"] is None and store.champion(client, MODEL) is None


def test_keys_commands(config, capsys, tmp_path):
    from mlops.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["keys", "export-public"])
    assert exc.value.code == 2
    assert "holds no keys yet" in capsys.readouterr().err
    main(["keys", "rotate"])
    first = Keyring.load().keys[0].key_id
    main(["keys", "rotate"])
    capsys.readouterr()
    main(["keys", "show"])
    out = capsys.readouterr().out
    assert f"{first}  created" in out and "retired" in out and "this machine's signing key" in out
    main(["keys", "export-public", "-o", str(tmp_path / "endpoint-keyring.json")])
    exported = Keyring.load(tmp_path / "endpoint-keyring.json")
    assert [k.key_id for k in exported.keys] == [k.key_id for k in Keyring.load().keys]


def test_a_revoked_approval_put_back_by_hand_stays_revoked(registry):
    from registry import actions, store

    uri, client = registry
    approval = client.get_model_version(MODEL, "1").tags[signing.SIGNATURE_TAG]
    actions.reject_version(uri, MODEL, "1", "regressed on slice 7", approver="carol")
    (entry,) = Keyring.load().revoked
    assert (entry["model"], entry["version"], entry["by"]) == (MODEL, "1", "carol")
    client.set_model_version_tag(MODEL, "1", signing.SIGNATURE_TAG, approval)  # an EDIT user restores it
    client.set_model_version_tag(MODEL, "1", "approval_status", "Approved")
    verdict = store.verify_version(client, store.get_version(client, MODEL, "1"))
    assert not verdict.approved and verdict.why.startswith("this approval was revoked by a later signed rejection")
