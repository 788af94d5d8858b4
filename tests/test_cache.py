"""FactorCache: round trip, versioned keys, validated entries, unusable folders, stale temp files."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

import qaf.data
import qaf.data.cifar10
import qaf.data.imagenet
from qaf import lit
from qaf.cache import FactorCache, tensor_digest
from qaf.decomp import admm, cp, epc, qswd
from qaf.methods import ranks
from qaf.quant import clip, uniform

KEY = {"weight": "abc", "method": "admm", "rank": 3, "bits": 4, "seed": 0}
SCHEMA = {"tensors": ["factor0"], "meta": ["iterations"]}
VERSIONS_FILE = Path(__file__).with_name("solver_versions.json")
#: Modules whose results are cached, with the constant that versions them.
VERSIONED = {"qaf.decomp.cp": (cp, "VERSION"), "qaf.decomp.epc": (epc, "VERSION"),
             "qaf.decomp.admm": (admm, "VERSION"), "qaf.decomp.qswd": (qswd, "VERSION"),
             "qaf.quant.uniform": (uniform, "VERSION"), "qaf.quant.clip": (clip, "uniform.VERSION"),
             "qaf.lit": (lit, "EVAL_VERSION"), "qaf.data": (qaf.data, "lit.EVAL_VERSION"),
             "qaf.data.cifar10": (qaf.data.cifar10, "lit.EVAL_VERSION"),
             "qaf.data.imagenet": (qaf.data.imagenet, "lit.EVAL_VERSION"),
             "qaf.methods.ranks": (ranks, "VERSION")}


def code_digest(module) -> str:
    """SHA-256 of a module's code without docstrings and comments (so prose edits need no bump)."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def version_of(name: str) -> int:
    module, attr = VERSIONED[name]
    owner, _, attr = attr.rpartition(".")
    return getattr({"lit": lit, "uniform": uniform}.get(owner, module), attr)


def test_solver_code_changes_come_with_a_version_bump():
    # A cached factorization must only be returned to the code that computes it. Changing a solver
    # module without bumping its VERSION (part of every cache key) would serve stale results:
    # when this fails, bump VERSION and run `python tests/test_cache.py` to record the new digest.
    recorded = json.loads(VERSIONS_FILE.read_text())
    stale = []
    for name, (module, _) in VERSIONED.items():
        entry = recorded.get(name, {})
        digest = code_digest(module)
        if entry.get("digest") != digest and entry.get("version") == version_of(name):
            stale.append(f"{name}: code changed but its version is still {entry.get('version')}")
        elif entry.get("version") != version_of(name) or entry.get("digest") != digest:
            stale.append(f"{name}: version {version_of(name)} not recorded (run python tests/test_cache.py)")
    assert not stale, "; ".join(stale)


def test_round_trip_and_key_sensitivity(tmp_path):
    cache = FactorCache(tmp_path)
    tensors = {"factor0": torch.arange(6.0).reshape(2, 3)}
    cache.put(KEY, tensors, {"iterations": 7})
    got, meta = cache.get(KEY, SCHEMA)
    assert torch.equal(got["factor0"], tensors["factor0"]) and meta == {"iterations": 7}
    assert cache.get({**KEY, "bits": 6}) is None
    assert cache.get({**KEY, "version": 3}) is None  # a newer algorithm version never sees old entries
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed, not left behind


def test_entries_that_break_the_schema_are_misses_with_one_warning(tmp_path, caplog):
    cache = FactorCache(tmp_path)
    cache.put(KEY, {"factor0": torch.tensor([1.0, float("nan")])}, {"iterations": 1})
    with caplog.at_level(logging.WARNING, logger="qaf.cache"):
        assert cache.get(KEY, SCHEMA) is None  # non-finite factors
        assert cache.get(KEY, SCHEMA) is None
    assert caplog.text.count("unusable") == 1
    cache.put(KEY, {"other": torch.ones(2)}, {})
    assert cache.get(KEY, SCHEMA) is None  # missing tensors and metadata


def test_corrupt_or_truncated_entry_is_recomputed(tmp_path):
    cache = FactorCache(tmp_path)
    cache.put(KEY, {"factor0": torch.ones(4)}, {"iterations": 1})
    path = cache.path(KEY)
    raw = path.read_bytes()
    for broken in (raw[: len(raw) // 2], raw[:-8] + b"\x00" * 8, b"garbage", b"{}", b"null", b"[]"):
        path.write_bytes(broken)
        assert cache.get(KEY, SCHEMA) is None
        calls = []
        got, _, hit = cache.get_or_compute(KEY, lambda: (calls.append(1) or {"factor0": torch.zeros(4)},
                                                         {"iterations": 2}), SCHEMA)
        assert not hit and calls == [1] and torch.equal(got["factor0"], torch.zeros(4))
        assert cache.get(KEY, SCHEMA) is not None  # the recomputed entry replaced the bad one


@pytest.mark.parametrize("where", ["a_file", "/proc/qaf-cache"])
def test_unusable_cache_folder_runs_uncached_with_a_warning(tmp_path, caplog, where):
    folder = tmp_path / "a_file" if where == "a_file" else Path(where)
    if where == "a_file":
        folder.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="qaf.cache"):
        cache = FactorCache(folder)
    assert not cache.enabled and "unusable" in caplog.text and str(folder) in caplog.text
    calls = []
    _, _, hit = cache.get_or_compute(KEY, lambda: (calls.append(1) or {"factor0": torch.ones(1)}, {"iterations": 0}))
    assert not hit and calls == [1]  # the run goes on, computing


def test_failed_write_disables_the_cache_instead_of_failing(tmp_path, caplog, monkeypatch):
    cache = FactorCache(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qaf.cache.tempfile.mkstemp", full_disk)
    with caplog.at_level(logging.WARNING, logger="qaf.cache"):
        cache.put(KEY, {"factor0": torch.ones(1)}, {"iterations": 0})
    assert not cache.enabled and "No space left" in caplog.text


def test_stale_temp_files_of_killed_writes_are_removed_when_the_cache_opens(tmp_path):
    old, fresh = tmp_path / ".tmp-old.pt", tmp_path / ".tmp-fresh.pt"
    for path in (old, fresh):
        path.write_bytes(b"half an entry")
    stamp = time.time() - 7200
    os.utime(old, (stamp, stamp))
    FactorCache(tmp_path)
    assert not old.exists() and fresh.exists()  # a fresh one may belong to a concurrent writer


def test_disabled_cache_never_hits(tmp_path):
    cache = FactorCache(tmp_path, enabled=False)
    cache.put(KEY, {"factor0": torch.ones(2)})
    assert cache.get(KEY) is None and not list(tmp_path.iterdir())


def test_tensor_digest_depends_on_values_dtype_and_shape():
    x = torch.arange(6.0)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x) != tensor_digest(x.reshape(2, 3))
    assert tensor_digest(x) != tensor_digest(x.double())
    y = x.clone()
    y[0] = 1e-7
    assert tensor_digest(x) != tensor_digest(y)


if __name__ == "__main__":  # record the current versions and digests
    VERSIONS_FILE.write_text(json.dumps({name: {"version": version_of(name), "digest": code_digest(m)}
                                         for name, (m, _) in VERSIONED.items()}, indent=2) + "\n")
    print(f"wrote {VERSIONS_FILE}")
