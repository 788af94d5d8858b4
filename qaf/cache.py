"""On-disk cache of factorizations, content-addressed by a key dict.

An entry is one file ``<sha256 of the key>.pt`` holding a header line with the SHA-256 of the
payload, then the payload (``torch.save`` of the key, tensors and metadata). Writes go to a
temporary file in the same directory followed by ``os.replace``, so readers never see a partial
entry and concurrent jobs writing the same key simply race to an identical result. Anything that
fails to load or verify is treated as a miss (and recomputed), never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FactorCache", "key_digest", "tensor_digest"]

log = logging.getLogger(__name__)
_MAGIC = b"qaf-cache-v1 "


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (device independent)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


def key_digest(key: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON form of ``key`` (sorted keys)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


class FactorCache:
    """Content-addressed store of tensors (factorizations) keyed by a dict.

    Parameters
    ----------
    dir : str or Path
        Cache directory (created on first write).
    enabled : bool
        When False, :meth:`get` always misses and :meth:`put` does nothing.
    """

    def __init__(self, dir: str | os.PathLike, enabled: bool = True):
        self.dir = Path(dir)
        self.enabled = enabled

    def path(self, key: dict[str, Any]) -> Path:
        """File that holds the entry for ``key``."""
        return self.dir / f"{key_digest(key)}.pt"

    def get(self, key: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """Return ``(tensors, meta)`` stored under ``key``, or None on a miss or a bad entry."""
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            header, payload = raw.split(b"\n", 1)
            if not header.startswith(_MAGIC):
                raise ValueError("bad header")
            if hashlib.sha256(payload).hexdigest() != header[len(_MAGIC):].decode():
                raise ValueError("checksum mismatch")
            entry = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            if entry["key"] != json.dumps(key, sort_keys=True, default=str):
                raise ValueError("key mismatch")
            return entry["tensors"], json.loads(entry["meta"])
        except Exception as exc:  # any unreadable entry is a miss, never trusted
            log.warning("cache entry %s is unusable (%s); recomputing", path.name, exc)
            return None

    def put(self, key: dict[str, Any], tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> None:
        """Store ``tensors`` (moved to the CPU) and JSON-able ``meta`` under ``key``, atomically."""
        if not self.enabled:
            return
        buf = io.BytesIO()
        entry = {
            "key": json.dumps(key, sort_keys=True, default=str),
            "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            "meta": json.dumps(meta or {}, sort_keys=True, default=str),
        }
        torch.save(entry, buf)
        payload = buf.getvalue()
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_or_compute(
        self,
        key: dict[str, Any],
        compute: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]],
    ) -> tuple[dict[str, Tensor], dict[str, Any], bool]:
        """Return ``(tensors, meta, hit)``, computing and storing the entry on a miss."""
        found = self.get(key)
        if found is not None:
            return found[0], found[1], True
        tensors, meta = compute()
        self.put(key, tensors, meta)
        return tensors, meta, False
