"""A mirror of the checkpoint tiers in S3 (or any S3-compatible store), with the local commit rules.

Layout: ``s3://<bucket>/<prefix>/<tier>/<name>/<file>`` and the tier's pointers at
``<prefix>/<tier>/<pointer>``. A checkpoint is uploaded after its local commit: the data files
first, ``manifest.json`` last, so the manifest is the commit marker: a checkpoint without a valid
manifest is never listed or restored. Deleting goes the other way round (manifest first). A restore
downloads into a local temporary directory and checks every file's size and checksum against the
manifest before the checkpoint is installed. boto3 is imported when the first client is made.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ml.checkpoint.policy import retention_victims
from ml.checkpoint.store import (
    MANIFEST,
    CheckpointCorrupt,
    check_digest,
    decode_manifest,
    decode_pointer,
    encode_pointer,
    entry_checksum,
    is_valid_name,
    new_digest,
    read_manifest,
)
from ml.errors import PipelineError

_DOWNLOAD_CHUNK = 8 << 20


class CheckpointMirrorError(PipelineError):
    """The mirror could not be reached, listed, written or read."""


class S3Mirror:
    """Uploads committed checkpoints to ``s3://bucket/prefix/`` and restores them.

    Args:
        bucket: an existing bucket.
        prefix: key prefix under which the tiers live.
        endpoint_url: an S3-compatible endpoint (MinIO, a moto server...), or None for AWS.
        client: a boto3 S3 client to use instead of one made from the environment's credentials.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client: Any = None) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"S3 bucket name {bucket!r}: expected a bucket name without '/'")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self._client = client
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import boto3

                self._client = boto3.client("s3", endpoint_url=self.endpoint_url)
            return self._client

    def key(self, tier: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, tier, *parts) if p)

    def url(self, tier: str, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(tier, *parts)}"

    def __repr__(self) -> str:
        return f"S3Mirror({self.url('').rstrip('/')!r}, endpoint_url={self.endpoint_url!r})"

    def _fail(self, what: str, where: str, exc: Exception) -> CheckpointMirrorError:
        return CheckpointMirrorError(f"{where}: {what} failed: {_reason(exc)}")

    # --- writing ---

    def upload(self, tier: str, name: str, local_dir: Path) -> int:
        """Uploads a locally committed checkpoint: every file its manifest lists, then the manifest.
        Returns the bytes uploaded."""
        from boto3.s3.transfer import TransferConfig

        body = read_manifest(local_dir)
        config = TransferConfig(max_concurrency=4)
        total = 0
        for fname, entry in sorted(body["files"].items(), key=lambda item: -item[1]["size"]):
            where = self.url(tier, name, fname)
            try:
                self.client.upload_file(str(local_dir / fname), self.bucket, self.key(tier, name, fname), Config=config)
            except Exception as exc:
                raise self._fail("upload", where, exc) from exc
            total += entry["size"]
        manifest = (local_dir / MANIFEST).read_bytes()
        self._put(self.key(tier, name, MANIFEST), manifest, self.url(tier, name, MANIFEST))
        return total + len(manifest)

    def _put(self, key: str, data: bytes, where: str) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except Exception as exc:
            raise self._fail("upload", where, exc) from exc

    def write_pointer(self, tier: str, pointer: str, payload: Mapping[str, Any]) -> None:
        """Replaces a pointer object (a single PUT is atomic in S3)."""
        self._put(self.key(tier, pointer), encode_pointer(payload), self.url(tier, pointer))

    def remove(self, tier: str, name: str) -> None:
        """Deletes a checkpoint: the manifest first, so a crash mid-delete leaves it uncommitted."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(tier, name, MANIFEST))
            keys = [key for key, _ in self._objects(self.key(tier, name) + "/")]
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": key} for key in keys[i:i + 1000]], "Quiet": True})
        except CheckpointMirrorError:
            raise
        except Exception as exc:
            raise self._fail("delete", self.url(tier, name), exc) from exc

    def prune(self, tier: str, keep: int, protected: Iterable[str] = ()) -> list[str]:
        """Deletes the oldest committed remote checkpoints beyond ``keep``, never one in
        ``protected`` nor one a remote pointer names. Returns the deleted names."""
        names = [name for name, _ in self.list(tier)[0]]
        keep_names = set(protected)
        for pointer in self._pointer_keys(tier):
            payload = self.read_pointer(tier, pointer)
            if payload is not None:
                keep_names.add(payload["name"])
        doomed = retention_victims(names, keep, keep_names)
        for name in doomed:
            self.remove(tier, name)
        return doomed

    # --- reading ---

    def _objects(self, prefix: str) -> list[tuple[str, int]]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return [(obj["Key"], obj["Size"]) for page in pages for obj in page.get("Contents", ())]
        except Exception as exc:
            raise self._fail("listing", f"s3://{self.bucket}/{prefix}", exc) from exc

    def _get(self, key: str, where: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise self._fail("download", where, exc) from exc

    def _pointer_keys(self, tier: str) -> list[str]:
        base = self.key(tier) + "/"
        return sorted(key[len(base):] for key, _ in self._objects(base) if "/" not in key[len(base):])

    def read_pointer(self, tier: str, pointer: str) -> dict[str, Any] | None:
        raw = self._get(self.key(tier, pointer), self.url(tier, pointer))
        return None if raw is None else decode_pointer(raw, self.url(tier, pointer))

    def list(self, tier: str) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
        """Committed remote checkpoints ``(name, manifest body)`` oldest first (by commit time),
        and the remote names that are not committed checkpoints ``(name, reason)``: uploads that
        never reached their manifest, or whose manifest does not verify."""
        base = self.key(tier) + "/"
        files: dict[str, set[str]] = {}
        for key, _ in self._objects(base):
            name, sep, fname = key[len(base):].partition("/")
            if sep and is_valid_name(name):
                files.setdefault(name, set()).add(fname)
        committed, rejected = [], []
        for name, fnames in sorted(files.items()):
            where = self.url(tier, name, MANIFEST)
            raw = self._get(self.key(tier, name, MANIFEST), where) if MANIFEST in fnames else None
            if raw is None:
                rejected.append((name, f"{where}: missing (upload never committed)"))
                continue
            try:
                committed.append((name, decode_manifest(raw, where, name)))
            except CheckpointCorrupt as exc:
                rejected.append((name, str(exc)))
        committed.sort(key=lambda item: (item[1]["created_ns"], item[0]))
        return committed, rejected

    def download(self, tier: str, name: str, dest: Path) -> dict[str, Any]:
        """Downloads a committed checkpoint into the empty directory ``dest``: each file streamed
        to disk while its checksum is computed, checked against the remote manifest, fsynced; the
        manifest last. Returns the manifest body.

        Raises:
            CheckpointCorrupt: the manifest is missing or invalid, or a file is missing, truncated
                or altered (naming its ``s3://`` URL).
        """
        where = self.url(tier, name, MANIFEST)
        raw = self._get(self.key(tier, name, MANIFEST), where)
        if raw is None:
            raise CheckpointCorrupt(f"{where}: missing (checkpoint never committed)")
        body = decode_manifest(raw, where, name)
        for fname, entry in body["files"].items():
            self._download_file(self.key(tier, name, fname), self.url(tier, name, fname), dest / fname, entry)
        with open(dest / MANIFEST, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        return body

    def _download_file(self, key: str, where: str, path: Path, entry: Mapping[str, Any]) -> None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _is_missing(exc):
                raise CheckpointCorrupt(f"{where}: missing") from None
            raise self._fail("download", where, exc) from exc
        digest, size = new_digest(entry_checksum(entry)[0]), 0
        try:
            with open(path, "wb") as f:
                for chunk in response["Body"].iter_chunks(_DOWNLOAD_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            raise
        except Exception as exc:
            raise self._fail("download", where, exc) from exc
        if size != entry["size"]:
            raise CheckpointCorrupt(f"{where}: size {size} != {entry['size']} in the manifest (truncated or altered)")
        check_digest(digest.hexdigest(), entry, where)


def _service_error(exc: Exception) -> dict[str, Any]:
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, dict) else None
    return error if isinstance(error, dict) else {}


def _is_missing(exc: Exception) -> bool:
    return str(_service_error(exc).get("Code", "")) in ("NoSuchKey", "404", "NotFound")


def _reason(exc: Exception) -> str:
    """botocore errors as one line: the service's code and message, or the exception text."""
    error = _service_error(exc)
    if error:
        return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
    return " ".join(str(exc).split()) or type(exc).__name__
