"""Per-layer CP ranks under a budget (``ranks=budget``, qaf.methods.ranks): the allocation, the
config checks, and small end-to-end runs on the embedded ResNet-20."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose, run_inprocess
from qaf.config import ConfigError, config_hash, result_config
from qaf.methods.ranks import BudgetOptions, allocate

#: A quick CPD-EPC whose scan has two candidates per layer, on few calibration and test images.
SMALL = ("method=cpd_epc", "method.als_iters=10", "method.epc_iters=10", "method.epc_min_iters=5",
         "ranks=budget", "ranks.rates=[2,4]", "ranks.samples=16", "data.calib_samples=32",
         "data.eval_samples=100")


def _brute_force(losses, costs, capacity):
    feasible = [c for c in itertools.product(*(range(len(x)) for x in costs))
                if sum(cost[i] for cost, i in zip(costs, c)) <= capacity]
    return min(sum(loss[i] for loss, i in zip(losses, c)) for c in feasible)


@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_the_least_loss_within_the_capacity(seed):
    rng = np.random.default_rng(seed)
    layers, k = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    costs = [sorted(rng.integers(1, 50, size=k).tolist(), reverse=True) for _ in range(layers)]
    losses = [sorted(rng.random(k).round(2).tolist()) for _ in range(layers)]  # cheaper: more loss
    capacity = int(sum(min(c) for c in costs) + rng.integers(0, 60))
    choice = allocate(losses, costs, capacity)
    assert sum(c[i] for c, i in zip(costs, choice)) <= capacity
    assert sum(x[i] for x, i in zip(losses, choice)) == pytest.approx(_brute_force(losses, costs, capacity))


def test_allocation_ties_go_to_the_cheaper_choice_and_none_fits_is_an_error():
    assert allocate([[0.0, 0.0], [1.0, 1.0]], [[10, 5], [4, 3]], 100) == [1, 1]
    with pytest.raises(ValueError, match="capacity 7"):
        allocate([[0.0], [0.0]], [[4], [4]], 7)


@pytest.mark.parametrize("node, message", [
    ({}, r"ranks=budget needs one target, neither given: accepted ranks.bops_pct=<%BOPs> or ranks.size_kb=<kB>"),
    ({"bops_pct": 1.2, "size_kb": 60}, "needs one target, both given"),
    ({"bops_pct": 0}, r"ranks.bops_pct=0 is invalid: accepted a finite number > 0 and <= 100"),
    ({"size_kb": "big"}, r"ranks.size_kb='big' is invalid"),
    ({"bops_pct": 1.2, "rates": []}, r"ranks.rates=\[\] is invalid: accepted a non-empty list of numbers > 1"),
    ({"bops_pct": 1.2, "rates": [2, 1]}, r"ranks.rates=\[2, 1\] is invalid"),
    ({"bops_pct": 1.2, "samples": 0}, r"ranks.samples=0 is invalid"),
    ({"bops_pct": 1.2, "budget": 3}, r"ranks.budget is not an option of ranks=budget: accepted bops_pct, rates"),
])
def test_budget_options_name_the_bad_key(node, message):
    with pytest.raises(ConfigError, match=message):
        BudgetOptions.from_config(node)


@pytest.mark.parametrize("overrides, message", [
    (("method=admm_epc", "ranks=budget"), "needs one target, neither given"),
    (("method=ptq", "ranks=budget", "ranks.bops_pct=2"), "method.ranks is not an option of method=ptq"),
    (("method=cpd_epc", "ranks=budget", "ranks.bops_pct=0.5", "ranks.samples=16"),
     r"ranks.bops_pct=0.5 is invalid: no allocation reaches it, the cheapest .* is 0.6\d+ %BOPs"),
    (("method=cpd_epc", "ranks=budget", "ranks.size_kb=60", "ranks.samples=4096"), "ranks.samples=4096 is too large"),
])
def test_bad_budgets_are_one_config_error_before_any_factorization(overrides, message, tmp_path: Path, monkeypatch):
    from qaf.methods import cp

    def refuse(*args, **kwargs):
        raise AssertionError("factorized before the config was checked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cp.CP, "factorize", refuse)
    with pytest.raises(ConfigError, match=message):
        run_inprocess(*overrides, "data.eval_samples=100", "data.calib_samples=64", "sweep_id=bad")


def test_uniform_ranks_leave_the_config_and_its_hash_as_they_were():
    plain, uniform = compose("method=admm_epc"), compose("method=admm_epc", "ranks=uniform")
    assert "ranks" not in result_config(plain) and "ranks" not in result_config(plain)["method"]
    assert config_hash(plain) == config_hash(uniform)
    assert config_hash(compose("method=admm_epc", "ranks=budget", "ranks.bops_pct=1.2")) != config_hash(plain)


def _ranks(metrics: dict) -> list[int]:
    return [layer["rank"] for layer in metrics["layers"]]


TARGET = 1.3  # %BOPs between uniform rate 2 (1.73 %) and rate 4 (0.92 %): the layers must differ


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> tuple[dict, Path]:
    """A run at the BOPs budget ``TARGET`` with a fresh cache: (its metrics, its folder)."""
    root = tmp_path_factory.mktemp("budget")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        return run_inprocess(*SMALL, f"ranks.bops_pct={TARGET}", "sweep_id=a"), root


def test_budget_is_met_recorded_and_the_same_twice_with_the_scan_cached(budget_run, monkeypatch):
    first, root = budget_run
    monkeypatch.chdir(root)
    second = run_inprocess(*SMALL, f"ranks.bops_pct={TARGET}", "sweep_id=b")  # the scan served from the cache
    summary = first["method_summary"]["ranks"]
    assert first["bops_pct"] <= TARGET and summary["predicted"] == first["bops_pct"]
    assert len(set(_ranks(first))) > 3  # ranks differ across layers, not a uniform rate
    assert _ranks(first) == _ranks(second) and first["top1"] == second["top1"]
    assert summary["cached_points"] == 0 and second["method_summary"]["ranks"]["cached_points"] == summary["points"]
    for layer in first["layers"]:
        curve = summary["curves"][layer["name"]]
        assert [layer["rank"], layer["rate"]] in [point[:2] for point in curve]
    assert first["method_info"]["variant"] == "ranks=budget"
    assert first["method_info"]["rate"] > 1
    saved = json.loads(next(root.glob("multirun_outputs/a/**/metrics.json")).read_text())
    assert saved["layers"] == first["layers"]


def test_a_size_budget_is_met(budget_run, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the budget run's scan, from its cache
    metrics = run_inprocess(*SMALL, "ranks.size_kb=70", "sweep_id=size", f"cache.dir={budget_run[1] / '.cache'}")
    assert metrics["size_bytes"] / 1e3 <= 70
    summary = metrics["method_summary"]["ranks"]
    assert summary["predicted"] == metrics["size_bytes"] / 1e3
    assert summary["cached_points"] == summary["points"]  # one scan serves every kind of budget
