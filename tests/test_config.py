"""Every config option composes and validates; bad values give one clear error naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import qaf.config  # noqa: F401  (registers the resolvers)
from qaf.config import ConfigError, config_hash, validate
from qaf.methods.base import Method

from conftest import ROOT, run_cli, run_main

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_groups_are_populated():
    assert {"fp32", "ptq", "cpd", "cpd_epc", "admm", "admm_epc", "lapq", "qswd"} <= set(options("method"))
    assert {"uniform", "qaf", "lapq"} <= set(options("policy"))
    assert {"none", "kd"} <= set(options("finetune"))
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
    from qaf.data.cifar10 import embedded
    from qaf.methods.base import CompressContext
    from qaf.models.cifar_resnet import build
    from qaf.quant.policy import LayerPolicy

    ctx = CompressContext(data=embedded(eval_samples=10), device=__import__("torch").device("cpu"),
                          policy=LayerPolicy.from_config(cfg.policy))
    instance.check(build(20), ctx)  # the defaults are valid on the default model


def test_methods_choose_their_reference_policy_and_protocol_unless_told_otherwise():
    assert compose_cfg("method=ptq").policy.name == "uniform"
    assert compose_cfg("method=admm_epc").policy.name == "qaf"
    lapq = compose_cfg("method=lapq")
    assert lapq.policy.name == "lapq" and not lapq.protocol.bn_recalibration
    fair = compose_cfg("method=lapq", "policy=uniform", "protocol.bn_recalibration=true")
    assert fair.policy.name == "uniform" and fair.protocol.bn_recalibration
    assert compose_cfg("method=qswd").finetune._target_ == "qaf.finetune.Distillation"
    assert not compose_cfg("method=qswd", "finetune=none").finetune


@pytest.mark.parametrize("policy", options("policy"))
def test_every_policy_validates(policy):
    from qaf.quant.policy import LayerPolicy

    assert LayerPolicy.from_config(compose_cfg(f"policy={policy}").policy).name == policy


def build_option(group: str, option: str, tmp_path: Path):
    """Compose ``group=option`` (with what an offline machine needs), validate, and build it."""
    extra = {("model", "resnet18"): ["model.pretrained=false"], ("data", "cifar10_embedded"): ["data.eval_samples=8"]}
    cfg = compose_cfg(f"{group}={option}", *extra.get((group, option), []))
    validate(cfg)
    if not cfg[group]:
        return None
    if group == "logger" and option == "wandb":
        return cfg.logger  # instantiating it starts a W&B run: tests/test_sweeps.py does that for real
    from qaf.pipeline import build  # instantiate, with a builder's ConfigError unwrapped

    return build(cfg[group], **({"save_dir": str(tmp_path)} if group == "logger" else {}))


def test_every_option_composes_and_builds(tmp_path: Path):
    import pytorch_lightning as pl
    import torch

    from qaf.data import DataBundle
    from qaf.finetune import Distillation

    assert isinstance(build_option("model", "resnet20_cifar", tmp_path), torch.nn.Module)
    assert type(build_option("model", "resnet18", tmp_path)).__name__ == "ResNet"
    assert isinstance(build_option("data", "cifar10_embedded", tmp_path), DataBundle)
    for option in ("cifar10", "imagenet"):  # need a folder the user names
        with pytest.raises(ConfigError, match="data.root"):
            build_option("data", option, tmp_path)
    assert isinstance(build_option("logger", "csv", tmp_path), pl.loggers.CSVLogger)
    wandb = build_option("logger", "wandb", tmp_path)
    assert wandb._target_.endswith("WandbLogger") and wandb.mode == "offline"
    assert build_option("logger", "none", tmp_path) is None and build_option("finetune", "none", tmp_path) is None
    assert isinstance(build_option("finetune", "kd", tmp_path), Distillation)
    tested = {"model": {"resnet20_cifar", "resnet18"}, "data": {"cifar10_embedded", "cifar10", "imagenet"},
              "logger": {"csv", "wandb", "none"}, "finetune": {"kd", "none"}}
    assert {group: set(options(group)) for group in tested} == tested, "a new option needs its line here"


def test_defaults():
    cfg = compose_cfg()
    assert (cfg.bits, cfg.act_bits, cfg.rate) == (4, 8, 2.0)
    assert cfg.model.depth == 20 and cfg.data.calib_samples == 2048 and cfg.data.eval_samples is None


@pytest.mark.parametrize(
    "override, key",
    [("bits=1", "bits"), ("bits=17", "bits"), ("act_bits=0", "act_bits"), ("bits=4.5", "bits"),
     ("rate=1.0", "rate"), ("rate=0.5", "rate"), ("rate=inf", "rate"), ("rate=nan", "rate"),
     ("seed=4294967296", "seed"), ("seed=-1", "seed"), ("resume=maybe", "resume"), ("device=tpu", "device")],
)
def test_bad_values_name_the_key(override, key):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError, match=rf"^{key}=.*accepted"):
        validate(cfg)


def test_config_hash_ignores_execution_keys_but_not_results():
    base = compose_cfg("method=ptq")
    same = ["method=ptq", "sweep_id=other", "logger=csv", "progress=false", "trainer.devices=2", "device=cpu",
            "data.num_workers=3", "cache.dir=/elsewhere", "overwrite=true", "trainer.accelerator=cpu"]
    assert config_hash(base) == config_hash(compose_cfg(*same))
    for different in ("bits=6", "data.batch_size=128", "trainer.precision=bf16-mixed", "data.bn_transform=eval",
                      "protocol.bn_recalibration=false", "policy=qaf", "seed=1"):
        assert config_hash(base) != config_hash(compose_cfg("method=ptq", different)), different


def test_job_folder_names_leave_out_every_execution_key():
    from qaf.config import EXECUTION_KEYS

    cfg = compose_cfg()
    excluded = set(OmegaConf.load(CONF / "hydra" / "default.yaml").job.config.override_dirname.exclude_keys)
    for key in EXECUTION_KEYS:
        if key == "hydra":
            continue
        node = OmegaConf.select(cfg, key)
        names = {key} if not isinstance(node, DictConfig) or key == "logger" else {f"{key}.{k}" for k in node}
        assert names <= excluded, f"{sorted(names - excluded)} missing from conf/hydra/default.yaml exclude_keys"


def test_sweep_ids_do_not_collide_within_a_second():
    # Two processes started back to back (same second): the random suffix keeps the ids apart.
    runs = [run_cli(["--cfg", "job", "--resolve"], cwd=ROOT, timeout=120) for _ in range(2)]
    ids = [line for r in runs for line in r.stdout.splitlines() if line.startswith("sweep_id:")]
    assert len(ids) == 2 and ids[0] != ids[1], ids
    # timestamp first, so ids sort by start time; then a random suffix
    assert re.fullmatch(r"sweep_id: \d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", ids[0]), ids[0]


@pytest.mark.parametrize("override, message", [
    ("bits=1", "bits=1 is invalid: accepted an integer in 2..16"),
    ("seed=4294967296", "seed=4294967296 is invalid: accepted an integer in 0..4294967295"),
    ("rate=inf", "rate=inf is invalid: accepted a finite number > 1"),
    ("+method.nosuch=1", "method.nosuch is not an option of method=ptq: accepted act_clip, clip, p, per_channel"),
    ("policy.stem=half", "policy.stem='half' is invalid: accepted bits, keep, float"),
])
def test_cli_bad_input_is_one_clear_error(tmp_path: Path, override: str, message: str, monkeypatch, capsys):
    status, _, err = run_main(["method=ptq", override, "logger=none"], tmp_path, monkeypatch, capsys)
    assert status == 2, err[-2000:]
    assert err.strip() == f"qaf: config error: {message}"  # one line, no traceback
    assert not list(tmp_path.rglob("metrics.json"))
    (failed,) = tmp_path.rglob("failed.json")  # recorded for the report, with the stage
    assert '"error_type": "ConfigError"' in failed.read_text()


def test_cli_unknown_option_lists_accepted(tmp_path: Path):
    result = run_cli(["method=nope"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "method/nope" in result.stderr and "admm_epc" in result.stderr
