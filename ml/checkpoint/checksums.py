"""The per-file checksums a manifest records, behind hashlib's interface.

* ``sha256``: a cryptographic digest, for milestones and releases, which are kept.
* ``crc32c``: CRC-32C (Castagnoli) with the CPU's CRC instruction (SSE 4.2 / ARMv8, via the
  ``crc32c`` package, which releases the GIL), about ten times faster than SHA-256. A CRC detects
  every burst error up to 32 bits, so every single flipped bit; a truncation is caught by the size
  the manifest records next to it. The training tier's default: its digest is most of what a
  background save costs a training loop on few cores.
* ``crc32``: zlib's CRC-32, with the same guarantees at a fifth of CRC-32C's speed; read for
  checkpoints written with it.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CHECKSUMS", "checksum_label", "entry_checksum", "file_digest", "is_checksum_hex", "new_digest"]

CHECKSUMS = ("sha256", "crc32c", "crc32")
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "crc32c": re.compile(r"[0-9a-f]{8}"),
        "crc32": re.compile(r"[0-9a-f]{8}")}
_LABEL = {"sha256": "SHA-256", "crc32c": "CRC-32C", "crc32": "CRC-32"}
_CHUNK = 1 << 20


class _Crc:
    """A running 32-bit CRC with hashlib's ``update``/``hexdigest``."""

    def __init__(self, step: Any, data: bytes | memoryview = b"") -> None:
        self._step = step
        self._value = step(data, 0)

    def update(self, data: bytes | memoryview) -> None:
        self._value = self._step(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def _crc32c_step(data: bytes | memoryview, value: int) -> int:
    import crc32c

    return crc32c.crc32c(data, value=value)


def new_digest(algorithm: str, data: bytes | memoryview = b"") -> Any:
    """A running checksum of one of :data:`CHECKSUMS` (hashlib interface)."""
    if algorithm == "sha256":
        return hashlib.sha256(data)
    if algorithm == "crc32c":
        return _Crc(_crc32c_step, data)
    if algorithm == "crc32":
        return _Crc(zlib.crc32, data)
    raise ValueError(f"checksum must be one of {', '.join(CHECKSUMS)}; got {algorithm!r}")


def is_checksum_hex(algorithm: str, value: Any) -> bool:
    return isinstance(value, str) and _HEX[algorithm].fullmatch(value) is not None


def checksum_label(algorithm: str) -> str:
    return _LABEL[algorithm]


def entry_checksum(entry: Mapping[str, Any]) -> tuple[str, str]:
    """``(algorithm, hex digest)`` of a manifest entry."""
    for algorithm in CHECKSUMS:
        if algorithm in entry:
            return algorithm, entry[algorithm]
    raise KeyError("no checksum")


def file_digest(path: Path, algorithm: str = "sha256") -> tuple[int, str]:
    """``(size, hex digest)`` of a file, read in chunks."""
    digest, size = new_digest(algorithm), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
