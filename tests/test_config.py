"""Every config option composes and validates; bad values give one clear error naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import qaf.config  # noqa: F401  (registers the resolvers)
from qaf.config import ConfigError, config_hash, validate
from qaf.methods.base import Method

from conftest import ROOT, run_cli

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_groups_are_populated():
    assert {"fp32", "ptq", "cpd", "cpd_epc", "admm", "admm_epc", "lapq"} <= set(options("method"))
    assert {"resnet20_cifar", "resnet18"} <= set(options("model"))
    assert {"cifar10_embedded", "cifar10", "imagenet"} <= set(options("data"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))


@pytest.mark.parametrize("method", options("method"))
def test_every_method_composes_and_instantiates(method):
    cfg = compose_cfg(f"method={method}")
    validate(cfg)
    instance = instantiate(cfg.method, bits=cfg.bits, act_bits=cfg.act_bits, rate=float(cfg.rate))
    assert isinstance(instance, Method)
    assert instance.name == method


@pytest.mark.parametrize("group", ["model", "data", "logger"])
def test_every_option_composes(group):
    for option in options(group):
        cfg = compose_cfg(f"{group}={option}")
        validate(cfg)
        assert cfg[group] is not None or option == "none"


def test_defaults():
    cfg = compose_cfg()
    assert (cfg.bits, cfg.act_bits, cfg.rate) == (4, 8, 2.0)
    assert cfg.model.depth == 20 and cfg.data.calib_samples == 2048 and cfg.data.eval_samples is None


@pytest.mark.parametrize(
    "override, key",
    [("bits=1", "bits"), ("bits=17", "bits"), ("act_bits=0", "act_bits"), ("bits=4.5", "bits"),
     ("rate=1.0", "rate"), ("rate=0.5", "rate"), ("data.calib_samples=0", "data.calib_samples"),
     ("data.batch_size=-3", "data.batch_size"), ("device=tpu", "device")],
)
def test_bad_values_name_the_key(override, key):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError, match=rf"^{key}=.*accepted"):
        validate(cfg)


def test_config_hash_ignores_output_keys_but_not_results():
    base = compose_cfg()
    assert config_hash(base) == config_hash(compose_cfg("sweep_id=other", "logger=csv", "progress=false"))
    assert config_hash(base) != config_hash(compose_cfg("bits=6"))


def test_sweep_ids_do_not_collide_within_a_second():
    # Two processes started back to back (same second): the random suffix keeps the ids apart.
    runs = [run_cli(["--cfg", "job", "--resolve"], cwd=ROOT, timeout=120) for _ in range(2)]
    ids = [line for r in runs for line in r.stdout.splitlines() if line.startswith("sweep_id:")]
    assert len(ids) == 2 and ids[0] != ids[1], ids
    # timestamp first, so ids sort by start time; then a random suffix
    assert re.fullmatch(r"sweep_id: \d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", ids[0]), ids[0]


def test_cli_bad_input_is_one_clear_error(tmp_path: Path):
    result = run_cli(["bits=1", "logger=none"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "qaf: config error: bits=1 is invalid: accepted an integer in 2..16" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_cli_unknown_option_lists_accepted(tmp_path: Path):
    result = run_cli(["method=nope"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "method/nope" in result.stderr and "admm_epc" in result.stderr
