"""On-disk cache of expensive results (factorizations, float accuracies), keyed by a dict.

A key names everything that determines the entry: the input (e.g. a weight digest), every option,
the dtype and device class, and the *version* of the algorithm that computed it (``VERSION`` of
each solver module, bumped whenever its numerics change), so an entry can only be returned to the
code that would compute it.

An entry is one file ``<sha256 of the key>.pt``: a header line with the SHA-256 of the payload,
then the payload (``torch.save`` of the key, tensors and metadata). Writes go to a temporary file
in the same directory followed by ``os.replace``, so readers never see a partial entry and
concurrent jobs writing the same key race to an identical result. On read, the checksum, the
full key and the entry's schema (tensor names, finite values, metadata fields) are checked;
anything else is a miss, with one warning, and is recomputed.

A cache that cannot be used (unwritable folder, a file in its place, a full disk) never stops a
run: it is detected when the cache opens and the run goes on uncached, with one warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FactorCache", "clean_stale_temps", "key_digest", "tensor_digest"]

log = logging.getLogger(__name__)
_MAGIC = b"qaf-cache-v2 "
_TMP_PREFIX = ".tmp-"
#: Temporary files older than this were left by killed writes (a write takes seconds).
STALE_SECONDS = 3600.0

Schema = dict[str, list[str]]


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (device independent)."""
    t = tensor.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


def key_digest(key: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON form of ``key`` (sorted keys)."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def clean_stale_temps(folder: Path, pattern: str, older_than: float = STALE_SECONDS) -> int:
    """Remove temporary files matching ``pattern`` in ``folder`` older than ``older_than`` seconds.

    Returns
    -------
    int
        How many were removed.
    """
    removed = 0
    now = time.time()
    for path in Path(folder).glob(pattern):
        try:
            if now - path.stat().st_mtime > older_than:
                path.unlink()
                removed += 1
        except OSError:
            pass  # another process removed or renamed it
    return removed


class FactorCache:
    """Content-addressed store of tensors and metadata keyed by a dict.

    Parameters
    ----------
    dir : str or Path
        Cache directory (created and probed when the cache opens).
    enabled : bool
        When False, :meth:`get` always misses and :meth:`put` does nothing.
    """

    def __init__(self, dir: str | os.PathLike, enabled: bool = True):
        self.dir = Path(dir)
        self.enabled = enabled
        self.problem: str | None = None
        self._warned: set[str] = set()
        if enabled:
            self.problem = self._probe()
            if self.problem:
                self.enabled = False
                log.warning("cache.dir=%s is unusable (%s): running without the cache", self.dir, self.problem)
            else:
                clean_stale_temps(self.dir, f"{_TMP_PREFIX}*")

    def _probe(self) -> str | None:
        """Why the folder cannot hold the cache, or None: create it and write a file into it."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=_TMP_PREFIX, suffix=".probe")
            os.close(fd)
            os.unlink(tmp)
        except OSError as err:
            return f"{type(err).__name__}: {err.strerror or err}"
        return None

    def path(self, key: dict[str, Any]) -> Path:
        """File that holds the entry for ``key``."""
        return self.dir / f"{key_digest(key)}.pt"

    def _warn(self, path: Path, reason: str) -> None:
        if path.name not in self._warned:
            self._warned.add(path.name)
            log.warning("cache entry %s is unusable (%s); recomputing", path.name, reason)

    def get(self, key: dict[str, Any], schema: Schema | None = None) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """Return ``(tensors, meta)`` stored under ``key``, or None on a miss or an invalid entry.

        Parameters
        ----------
        key : dict
            The entry's full key.
        schema : dict, optional
            ``{"tensors": [names], "meta": [names]}`` the entry must hold (tensors finite).
        """
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            self._warn(path, f"unreadable: {err.strerror}")
            return None
        try:
            header, payload = raw.split(b"\n", 1)
            if not header.startswith(_MAGIC):
                raise ValueError("bad header (an older cache format?)")
            if hashlib.sha256(payload).hexdigest() != header[len(_MAGIC):].decode():
                raise ValueError("checksum mismatch")
            entry = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("key") != _canonical(key):
                raise ValueError("key mismatch")
            tensors, meta = entry["tensors"], json.loads(entry["meta"])
            _check_schema(tensors, meta, schema)
            return tensors, meta
        except Exception as exc:  # any entry that does not verify is a miss, never trusted
            self._warn(path, str(exc))
            return None

    def put(self, key: dict[str, Any], tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> None:
        """Store ``tensors`` (moved to the CPU) and JSON-able ``meta`` under ``key``, atomically.

        A failed write (full disk, folder removed) disables the cache for the rest of the run
        with one warning; it never fails the run.
        """
        if not self.enabled:
            return
        buf = io.BytesIO()
        entry = {
            "key": _canonical(key),
            "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            "meta": json.dumps(meta or {}, sort_keys=True, default=str),
        }
        torch.save(entry, buf)
        payload = buf.getvalue()
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=_TMP_PREFIX, suffix=".pt")
            with os.fdopen(fd, "wb") as fh:
                fh.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(key))
        except OSError as err:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            self.enabled = False
            self.problem = f"{type(err).__name__}: {err.strerror or err}"
            log.warning("cache.dir=%s: cannot write (%s): running without the cache", self.dir, self.problem)

    def get_or_compute(
        self,
        key: dict[str, Any],
        compute: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]],
        schema: Schema | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Any], bool]:
        """Return ``(tensors, meta, hit)``, computing and storing the entry on a miss."""
        found = self.get(key, schema)
        if found is not None:
            return found[0], found[1], True
        tensors, meta = compute()
        self.put(key, tensors, meta)
        return tensors, meta, False


def _check_schema(tensors: Any, meta: Any, schema: Schema | None) -> None:
    if not isinstance(tensors, dict) or not isinstance(meta, dict):
        raise ValueError("malformed entry")
    if schema is None:
        return
    missing = [n for n in schema.get("tensors", []) if not isinstance(tensors.get(n), Tensor)]
    missing += [n for n in schema.get("meta", []) if n not in meta]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for name in schema.get("tensors", []):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"non-finite values in {name}")
