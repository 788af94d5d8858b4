"""FactorCache: round trip, key sensitivity, atomicity and corrupt entries."""

from __future__ import annotations

import torch

from qaf.cache import FactorCache, tensor_digest

KEY = {"weight": "abc", "method": "admm", "rank": 3, "bits": 4, "seed": 0}


def test_round_trip_and_key_sensitivity(tmp_path):
    cache = FactorCache(tmp_path)
    tensors = {"factor0": torch.arange(6.0).reshape(2, 3)}
    cache.put(KEY, tensors, {"iterations": 7})
    got, meta = cache.get(KEY)
    assert torch.equal(got["factor0"], tensors["factor0"]) and meta == {"iterations": 7}
    assert cache.get({**KEY, "bits": 6}) is None
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed, not left behind


def test_corrupt_or_truncated_entry_is_recomputed(tmp_path):
    cache = FactorCache(tmp_path)
    cache.put(KEY, {"factor0": torch.ones(4)}, {})
    path = cache.path(KEY)
    raw = path.read_bytes()
    for broken in (raw[: len(raw) // 2], raw[:-8] + b"\x00" * 8, b"garbage"):
        path.write_bytes(broken)
        assert cache.get(KEY) is None
        calls = []
        got, _, hit = cache.get_or_compute(KEY, lambda: (calls.append(1) or {"factor0": torch.zeros(4)}, {}))
        assert not hit and calls == [1] and torch.equal(got["factor0"], torch.zeros(4))
        assert cache.get(KEY) is not None  # the recomputed entry replaced the bad one


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
