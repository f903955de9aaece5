"""Signed approval records: the approval authority's Ed25519 key, the keyring that verifies it, and
the digest of a model version's weights that a record binds.

MLflow lets anyone with EDIT permission set a version's tags and a model's aliases, so a tag saying
``Approved`` proves nothing. An approval is a record (model, version, weights digest, decision,
approver, time, reason, self-approval override) signed with the approver's private key; the serving
endpoint, the promotion flow and ``mlops models`` verify it with public keys from a keyring file.

Why not the OpenSSF ``model-signing`` package (1.1.1) for the weights half: it signs a model
directory as an in-toto statement inside a Sigstore bundle, which cannot carry the decision,
approver and reason that make a record an approval, so the signed record is needed anyway; its key
signer takes EC keys only; and it pulls 15 packages (sigstore, tuf, securesystemslib,
rfc3161-client, in-toto-attestation, blake3, PyJWT, dnspython, ...) into every install for what is
here a SHA-256 over a sorted file list, the same manifest idea its ``files`` serialization uses.
Signing and verifying go through ``cryptography``, already a dependency of MLflow.

Keys: the private key is created on first use under the user's config directory
(``$MLOPS_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/mlops-pipeline``, else ``~/.config/mlops-pipeline``)
with mode 0600. The keyring (``$MLOPS_APPROVAL_KEYRING``, else ``keyring.json`` in that directory)
lists public keys; rotation adds a key and keeps the old ones, so old approvals still verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ml.errors import RegistryError
from ml.io import atomic_write

SCHEMA = "mlops-pipeline/approval/v1"
SIGNATURE_TAG = "approval_signature"  # one tag, written at once: {"payload", "signature", "key_id"}
KEY_FILE = "approval-key.pem"
KEYRING_FILE = "keyring.json"
DIGEST_PREFIX = "sha256:"


def config_dir() -> Path:
    if os.environ.get("MLOPS_CONFIG_DIR"):
        return Path(os.environ["MLOPS_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mlops-pipeline"


def private_key_path() -> Path:
    return config_dir() / KEY_FILE


def keyring_path(explicit: str | Path | None = None) -> Path:
    """``explicit`` (a command-line option), else ``$MLOPS_APPROVAL_KEYRING``, else the config dir's."""
    chosen = explicit or os.environ.get("MLOPS_APPROVAL_KEYRING")
    return Path(chosen) if chosen else config_dir() / KEYRING_FILE


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- keys --------------------------------------------------------------------------------------------

def key_id_of(public_raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class KeyEntry:
    """A public key the keyring trusts; ``retired`` is when rotation replaced it (it still verifies)."""

    key_id: str
    public_key: str  # base64 of the raw 32 bytes
    created: str
    retired: str | None = None
    comment: str = ""


@dataclass
class Keyring:
    """Public keys that verify approvals, read from a JSON file ``{"keys": [KeyEntry, ...],
    "revoked": [...]}``. ``revoked`` lists approvals withdrawn by a later signed rejection (by the
    SHA-256 of their signature), so a revoked approval put back on a version by hand stays revoked
    wherever this keyring is read."""

    path: Path
    keys: list[KeyEntry] = field(default_factory=list)
    revoked: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Keyring:
        """The keyring at ``path`` (see :func:`keyring_path`); empty when the file does not exist."""
        path = keyring_path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            keys = [KeyEntry(**entry) for entry in data["keys"]]
            revoked = [dict(entry) for entry in data.get("revoked", [])]
            if not all("signature_sha256" in entry for entry in revoked):
                raise KeyError("signature_sha256")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"keyring {path}: expected JSON {{\"keys\": [{{\"key_id\", \"public_key\", "
                                f"\"created\"}}, ...]}} ({exc.__class__.__name__}: {exc})") from None
        return cls(path, keys, revoked)

    def to_dict(self) -> dict[str, Any]:
        return {"keys": [asdict(k) for k in self.keys], "revoked": self.revoked}

    def save(self) -> None:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write(self.path, lambda tmp: (tmp.write_text(text), tmp.chmod(0o644)))

    def revoke_approval(self, envelope: str, model: str, version: str, by: str) -> None:
        """Records that the approval in ``envelope`` (an ``approval_signature`` tag) was withdrawn."""
        digest = hashlib.sha256(json.loads(envelope)["signature"].encode()).hexdigest()
        if not any(entry["signature_sha256"] == digest for entry in self.revoked):
            self.revoked.append({"signature_sha256": digest, "model": model, "version": version, "by": by,
                                 "at": now_utc()})

    def is_revoked(self, signature_b64: str) -> bool:
        digest = hashlib.sha256(signature_b64.encode()).hexdigest()
        return any(entry["signature_sha256"] == digest for entry in self.revoked)

    def find(self, key_id: str) -> KeyEntry | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def add(self, public_raw: bytes, comment: str = "") -> KeyEntry:
        entry = self.find(key_id_of(public_raw))
        if entry is None:
            entry = KeyEntry(key_id_of(public_raw), base64.b64encode(public_raw).decode(), now_utc(), None, comment)
            self.keys.append(entry)
        return entry

    def retire(self, key_id: str) -> None:
        """Marks ``key_id`` replaced by rotation; it still verifies what it signed."""
        self.keys = [KeyEntry(**{**asdict(k), "retired": now_utc()}) if k.key_id == key_id and not k.retired else k
                     for k in self.keys]

    def revoke(self, key_id: str) -> None:
        """Drops ``key_id``: what it signed no longer verifies against this keyring."""
        if self.find(key_id) is None:
            raise RegistryError(f"key {key_id}: not in keyring {self.path} "
                                f"(it holds {', '.join(k.key_id for k in self.keys) or 'no keys'})")
        self.keys = [k for k in self.keys if k.key_id != key_id]

    def verify(self, payload: bytes, signature_b64: str, key_id: str) -> str | None:
        """None when ``signature_b64`` is ``key_id``'s signature of ``payload``, else why not."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        entry = self.find(key_id)
        if entry is None:
            return f"signed with key {key_id}, which keyring {self.path} does not hold"
        try:
            Ed25519PublicKey.from_public_bytes(base64.b64decode(entry.public_key)).verify(
                base64.b64decode(signature_b64, validate=True), payload)
        except (InvalidSignature, ValueError):
            return f"the signature does not verify with key {key_id}"
        return None


def _check_private_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise RegistryError(f"approval key {path}: mode {mode:04o} lets other users read it; "
                            f"expected 0600 (chmod 600 {path})")


def load_private_key(create: bool = True) -> Any:
    """The approver's Ed25519 private key; created (0600) on first use, its public key added to the
    keyring. Raises when it is missing and ``create`` is false, or readable by other users."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = private_key_path()
    if not path.exists():
        if not create:
            raise RegistryError(f"approval key {path}: not found; `mlops keys rotate` creates one")
        return _write_new_key(path)
    _check_private_mode(path)
    try:
        return load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise RegistryError(f"approval key {path}: not a PEM Ed25519 private key ({exc})") from None


def _write_new_key(path: Path) -> Any:
    import getpass
    import socket

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, lambda tmp: (tmp.chmod(0o600), tmp.write_bytes(pem)))  # mkstemp: 0600 from the start
    keyring = Keyring.load()
    entry = keyring.add(_public_raw(key), comment=f"{getpass.getuser()}@{socket.gethostname()}")
    keyring.save()
    return key


def rotate_key(revoke_old: bool = False) -> tuple[str | None, str]:
    """A new private key in place of the current one (or of a lost one). The old public key stays
    in the keyring, retired, so approvals it signed still verify; ``revoke_old`` drops it instead (a
    stolen key: what it signed must stop verifying). Other keys in the keyring are left alone.
    Returns (old key id, or None when there was no key, new key id)."""
    path = private_key_path()
    old = key_id_of(_public_raw(load_private_key(create=False))) if path.exists() else None
    new = key_id_of(_public_raw(_write_new_key(path)))
    if old is not None:
        keyring = Keyring.load()
        if revoke_old and keyring.find(old):
            keyring.revoke(old)
        else:
            keyring.retire(old)
        keyring.save()
    return old, new


# -- records -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApprovalRecord:
    """What a signature binds: one decision on one version's weights."""

    model: str
    version: str
    weights_digest: str
    decision: str
    approver: str
    at: str
    reason: str
    self_approval: bool
    identity: str  # how the approver was identified: "mlflow basic-auth <server>" or "local user"
    key_id: str
    schema: str = SCHEMA

    def payload(self) -> bytes:
        """The canonical bytes that are signed: sorted keys, no whitespace, UTF-8."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(record: ApprovalRecord, private_key: Any) -> str:
    """The ``approval_signature`` tag value: the payload, its signature and the key id."""
    payload = record.payload()
    return json.dumps({"payload": payload.decode(), "key_id": record.key_id,
                       "signature": base64.b64encode(private_key.sign(payload)).decode()})


def signer_key_id(private_key: Any) -> str:
    return key_id_of(_public_raw(private_key))


@dataclass(frozen=True)
class Verdict:
    """What a version's signed record proves. ``approved``: a signed Approved decision for exactly
    this model version (and these weights and this author, where they were checked) verifies.
    ``status``: the decision that verifies, PendingManualApproval when none does."""

    approved: bool
    status: str
    why: str
    record: ApprovalRecord | None = None

    def line(self) -> str:
        if self.record is not None and not self.why:
            r = self.record
            return f"signed by {r.approver} ({r.identity}, key {r.key_id}) at {r.at}: {r.decision}"
        return self.why


def verify_tags(name: str, version: str, tags: dict[str, str], keyring: Keyring, weights_digest: str | None = None,
                author: str | None = None, pending: str = "PendingManualApproval",
                approved: str = "Approved") -> Verdict:
    """Checks a version's ``approval_signature`` tag against its ``approval_status`` claim.

    The signature is checked always; the weights only when ``weights_digest`` (of the artifacts as
    downloaded now) is given; separation of duties only when ``author`` (of the source run) is.
    """
    claimed = tags.get("approval_status", pending)
    envelope = tags.get(SIGNATURE_TAG)
    if not envelope:
        why = "" if claimed == pending else f"approval_status says {claimed} but no signed decision exists"
        return Verdict(False, pending, why)
    try:
        outer = json.loads(envelope)
        payload = outer["payload"].encode()
        record = ApprovalRecord(**json.loads(payload))
        problem = keyring.verify(payload, outer["signature"], outer["key_id"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return Verdict(False, pending, f"{SIGNATURE_TAG} is not a signed approval record")
    if problem is None and keyring.is_revoked(outer["signature"]):
        problem = f"this approval was revoked by a later signed rejection (keyring {keyring.path})"
    if problem is None and record.key_id != outer["key_id"]:
        problem = f"the record names key {record.key_id} but was signed with {outer['key_id']}"
    if problem is None and (record.model, record.version) != (name, str(version)):
        problem = f"the signed record is for {record.model} v{record.version}, not this version"
    if problem:
        return Verdict(False, pending, problem)
    if weights_digest is not None and record.weights_digest != weights_digest:
        return Verdict(False, record.decision, f"the weights' digest {weights_digest} differs from the signed "
                                       f"{record.weights_digest}", record)
    if record.decision == approved and author and record.approver == author and not record.self_approval:
        return Verdict(False, record.decision, f"approver {record.approver!r} authored the source run and no "
                                       "self-approval override was signed", record)
    if claimed != record.decision:
        return Verdict(record.decision == approved, record.decision,
                       f"approval_status says {claimed} but the signed decision is {record.decision}", record)
    return Verdict(record.decision == approved, record.decision, "", record)


def directory_digest(root: str | Path) -> str:
    """SHA-256 over every file under ``root``: sorted relative paths, each with its own SHA-256."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise RegistryError(f"{root}: no model files to digest")
    manifest = hashlib.sha256()
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        manifest.update(f"{path.relative_to(root).as_posix()}\0{digest.hexdigest()}\n".encode())
    return DIGEST_PREFIX + manifest.hexdigest()
