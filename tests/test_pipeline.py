"""One run end to end: `python run.py` as users run it, and the pipeline in-process for the protocol,
determinism, failures and output folders."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, run_inprocess, run_main
from qaf import lit, outputs
from qaf.config import ConfigError

TINY = ("data.eval_samples=100", "data.calib_samples=64", "cache.enabled=false")


def metrics_files(root: Path) -> list[Path]:
    return sorted(root.glob("multirun_outputs/*/**/metrics.json"))


def load_single(root: Path) -> dict:
    (path,) = metrics_files(root)
    return json.loads(path.read_text())


@pytest.mark.slow  # two passes over 10,000 images in a fresh process
def test_fp32_scores_the_published_91_73_on_the_full_test_set(tmp_path: Path):
    result = run_cli(["method=fp32", "logger=csv", "progress=false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = load_single(tmp_path)
    assert metrics["top1"] == 91.73 and metrics["eval_samples"] == 10_000  # 9,173 of 10,000
    assert [round(v, 2) for v in metrics["top1_ci95"]] == [91.17, 92.25]  # Wilson (Wald: [91.19, 92.27])
    assert metrics["fp32_top1"] == metrics["top1"] and metrics["vs_fp32"]["diff"] == 0
    assert metrics["bops_pct"] == pytest.approx(100.0) and metrics["bops_pct_paper"] == 100.0
    assert metrics["compression_ratio"] == 1.0 and metrics["size_bytes"] == metrics["fp32_size_bytes"]
    assert metrics["protocol"]["bn_recalibration"] is False  # nothing changed the float weights
    assert metrics["code"]["git_commit"] and isinstance(metrics["code"]["git_dirty"], bool)
    assert metrics["packages"]["torch"] == torch.__version__.split("+")[0]
    predictions = np.load(next(tmp_path.glob("multirun_outputs/*/predictions.npz")))
    correct = np.unpackbits(predictions["correct1"])[: int(predictions["n"])]
    assert correct.sum() == 9173
    assert list(tmp_path.glob("multirun_outputs/*/csv/*/metrics.csv"))
    assert not list(tmp_path.glob("multirun_outputs/*/running.json"))


def test_ptq_run_logs_to_wandb_offline_and_records_its_protocol(tmp_path: Path, monkeypatch, capsys):
    args = ["method=ptq", "bits=8", "sweep_id=ptq8", "data.eval_samples=500", "data.calib_samples=128",
            "progress=false"]
    status, out_text, err_text = run_main(args, tmp_path, monkeypatch, capsys)
    assert status == 0, err_text[-3000:]
    out = tmp_path / "multirun_outputs" / "ptq8"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ptq" and metrics["bits"] == 8 and metrics["policy"] == "uniform"
    assert metrics["protocol"] == {"bn_recalibration": True, "calib_samples": 128, "calib_split": "train",
                                   "bn_transform": "train", "calib_transform": "eval", "eval_samples": 500,
                                   "policy": metrics["protocol"]["policy"], "finetune": None}
    assert 0 < metrics["bops_pct"] < 100 * 64 / 1024 + 1e-9  # every layer at 8x8 bits or less
    assert metrics["bops_pct_paper"] == pytest.approx(100 * 8 * 8 / 1024)
    assert metrics["layers"] and all("name" in layer for layer in metrics["layers"])
    assert abs(metrics["top1"] - metrics["fp32_top1"]) < 2
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "W&B offline run missing"
    assert "result: top-1" in out_text + err_text  # the one-line result of a single run


def test_failed_run_leaves_no_metrics(tmp_path: Path, monkeypatch, capsys):
    missing = tmp_path / "nope.th"
    status, _, err = run_main(["method=ptq", f"model.checkpoint={missing}", "logger=none"], tmp_path, monkeypatch,
                              capsys)
    assert status == 2
    assert "model.checkpoint" in err and "Traceback" not in err
    assert not metrics_files(tmp_path)
    (failed,) = tmp_path.glob("multirun_outputs/*/failed.json")
    assert json.loads(failed.read_text())["stage"] == "setup"


def test_imagenet_folders_and_torchvision_resnet18_end_to_end(tmp_path: Path, shared_data: Path, monkeypatch,
                                                              capsys):
    # The real ImageNet path: torchvision ResNet-18 (random init: no pretrained weights offline)
    # on class folders labelled through the canonical WNID list, at 224x224.
    root = shared_data / "imagenet_val_1300"
    status, _, err = run_main(["method=ptq", "bits=8", "model=resnet18", "model.pretrained=false", "data=imagenet",
                               f"data.root={root}", "data.calib_split=val", "data.calib_samples=4",
                               "data.eval_samples=8", "data.batch_size=4", "data.num_workers=0", "logger=none",
                               "progress=false"], tmp_path, monkeypatch, capsys)
    assert status == 0, err[-3000:]
    metrics = load_single(tmp_path)
    assert metrics["data"] == "imagenet" and metrics["model"] == "resnet18"
    assert metrics["fp32_macs"] == 1_819_040_768
    assert metrics["bops_pct"] < 100 * 64 / 1024 + 1e-9


# --- in-process ---------------------------------------------------------------------------------

FAMILIES = {
    "fp32": ["method=fp32"],
    "ptq": ["method=ptq", "method.per_channel=true"],
    "lapq": ["method=lapq", "bits=4", "act_bits=4", "method.calib_samples=32", "method.p_count=3",
             "method.maxiter=0", "method.batch_size=32"],
    "cpd_epc": ["method=cpd_epc", "method.include=[layer3.*]", "method.als_iters=5", "method.epc_iters=5",
                "method.epc_min_iters=2"],
    "admm": ["method=admm", "method.include=[layer2.0.*]", "method.admm_outer=2"],
    "qswd": ["method=qswd", "method.include=[layer3.2.*]", "method.max_iter=10", "finetune.steps=2",
             "finetune.samples=128", "finetune.batch_size=64"],
}
VOLATILE = ("timings", "finetune_summary")  # wall-clock seconds


class EvalGuard(torch.utils.data.Dataset):
    """An evaluation set that raises when read outside the pipeline's evaluation stages."""

    def __init__(self, base: torch.utils.data.Dataset, stage: list[str]):
        self.base, self.stage = base, stage

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self.stage[-1] not in ("fp32_eval", "eval", "deploy_eval"):
            raise AssertionError(f"evaluation image {i} read during the {self.stage[-1]} stage")
        return self.base[i]


@pytest.fixture
def guarded_eval(monkeypatch) -> list[str]:
    """Every run's evaluation set is an :class:`EvalGuard`; returns the stages the runs went through."""
    from qaf import pipeline
    from qaf.data import cifar10

    stages: list[str] = ["build"]
    stage = pipeline.Stages.stage

    @contextlib.contextmanager
    def recorded(self, name):
        stages.append(name)
        try:
            with stage(self, name):
                yield
        finally:
            stages.append("between stages")

    builder = cifar10.embedded

    def guarded(*args, **kwargs):
        bundle = builder(*args, **kwargs)
        bundle.eval = EvalGuard(bundle.eval, stages)
        return bundle

    monkeypatch.setattr(pipeline.Stages, "stage", recorded)
    monkeypatch.setattr(cifar10, "embedded", guarded)
    return stages


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_config_twice_gives_identical_metrics_and_calibration_never_reads_an_evaluation_image(
        family: str, tmp_path: Path, monkeypatch, guarded_eval: list[str]):
    monkeypatch.chdir(tmp_path)
    first = run_inprocess(*FAMILIES[family], *TINY, "sweep_id=a")
    second = run_inprocess(*FAMILIES[family], *TINY, "sweep_id=b")
    differs = [k for k in first if k not in VOLATILE + ("sweep_id", "layers", "method_summary")
               and first[k] != second[k]]
    assert not differs, {k: (first[k], second[k]) for k in differs}
    strip = ("seconds", "seconds_als", "seconds_epc", "seconds_admm", "cached")
    assert [{k: v for k, v in layer.items() if k not in strip} for layer in first["layers"]] == \
        [{k: v for k, v in layer.items() if k not in strip} for layer in second["layers"]]
    a, b = (np.load(tmp_path / "multirun_outputs" / s / "predictions.npz") for s in ("a", "b"))
    assert np.array_equal(a["correct1"], b["correct1"])
    ran = set(guarded_eval)  # the guard was in place through every stage of this family's protocol
    assert {"compress", "observe", "fp32_eval", "eval", "deploy", "deploy_eval"} <= ran
    assert ("finetune" in ran) == (family == "qswd") and ("bn_recalibration" in ran) == (family not in ("fp32", "lapq"))


def test_a_folder_holding_another_configs_results_is_refused_or_moved_aside(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_inprocess("method=ptq", *TINY, "sweep_id=shared")
    with pytest.raises(ConfigError, match=r"sweep_id=shared: .* another config .*overwrite=true"):
        run_inprocess("method=ptq", "bits=8", *TINY, "sweep_id=shared")
    folder = tmp_path / "multirun_outputs" / "shared"
    assert json.loads((folder / "metrics.json").read_text())["config_hash"] == first["config_hash"]
    assert json.loads((folder / "failed.json").read_text())["stage"] == "output_folder"
    from qaf.report.collect import FAILED, job_state

    assert job_state(folder).status == FAILED  # the refused launch is the folder's latest state
    second = run_inprocess("method=ptq", "bits=8", *TINY, "sweep_id=shared", "overwrite=true")
    (kept,) = folder.glob(".replaced/*/metrics.json")
    assert json.loads(kept.read_text())["config_hash"] == first["config_hash"]
    assert json.loads((folder / "metrics.json").read_text())["config_hash"] == second["config_hash"]
    assert not (folder / "failed.json").exists()


DAMAGED = ["[]", "null", "{}", '{"top1": NaN}', '{"method": "ptq"']


def test_a_damaged_metrics_json_is_set_aside_and_the_run_repeated(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "multirun_outputs" / "damaged"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(DAMAGED[-1])
    metrics = run_inprocess("method=fp32", *TINY, "sweep_id=damaged")
    assert json.loads((folder / "metrics.json").read_text())["top1"] == metrics["top1"]
    (kept,) = folder.glob(".replaced/*/metrics.json")
    assert kept.read_text() == DAMAGED[-1]


@pytest.mark.parametrize("content", DAMAGED)
def test_no_damaged_metrics_json_counts_as_finished(content: str, tmp_path: Path):
    (tmp_path / "metrics.json").write_text(content)  # what the run above meets, each kind of damage
    assert outputs.prepare(tmp_path, "0123456789abcdef", resume=True, overwrite=False, sweep_id="s") is None
    (kept,) = tmp_path.glob(".replaced/*/metrics.json")
    assert kept.read_text() == content and not (tmp_path / "metrics.json").exists()


def test_a_job_run_again_moves_the_logger_runs_of_its_earlier_attempts_aside(tmp_path: Path):
    # What a killed attempt (a requeued cluster job) and a failed one leave behind.
    folder = tmp_path / "job"
    (folder / "wandb" / "offline-run-killed").mkdir(parents=True)
    (folder / "csv" / "version_0").mkdir(parents=True)
    (folder / "running.json").write_text("{}")
    (folder / "failed.json").write_text("{}")
    assert outputs.prepare(folder, "0123456789abcdef", resume=True, overwrite=False, sweep_id="s") is None
    (moved,) = folder.glob(".replaced/*")
    assert sorted(p.name for p in moved.iterdir()) == ["csv", "wandb"]
    assert (moved / "wandb" / "offline-run-killed").is_dir()
    assert (folder / "failed.json").exists()  # removed when the job succeeds, as before


def test_metrics_json_is_strict_json(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_inprocess("method=ptq", *TINY, "sweep_id=strict")
    text = (tmp_path / "multirun_outputs" / "strict" / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))


def test_an_exception_writes_failed_json_with_its_stage_and_no_metrics(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(lit, "evaluate", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        run_inprocess("method=ptq", *TINY, "sweep_id=boom")
    folder = tmp_path / "multirun_outputs" / "boom"
    failed = json.loads((folder / "failed.json").read_text())
    assert failed["error_type"] == "RuntimeError" and failed["stage"] == "fp32_eval"
    assert failed["message"] == "evaluation exploded" and len(failed["config_hash"]) == 16
    assert not (folder / "metrics.json").exists() and not (folder / "running.json").exists()


@pytest.mark.parametrize("method", ["fp32", "ptq", "lapq", "cpd"])
def test_non_finite_weights_are_a_config_error_for_every_method(method: str, tmp_path: Path, monkeypatch):
    from qaf.models.cifar_resnet import build

    monkeypatch.chdir(tmp_path)
    state = build(20).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.th")
    with pytest.raises(ConfigError, match=r"model.checkpoint: tensor layer2.0.conv1.weight holds NaN"):
        run_inprocess(f"method={method}", f"model.checkpoint={tmp_path / 'nan.th'}", *TINY, "sweep_id=nan")


def test_float_accuracy_cache_is_keyed_by_precision(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ("method=fp32", "data.eval_samples=100", "data.calib_samples=64", "cache.dir=cache")

    def entries() -> set[str]:
        return {p.name for p in (tmp_path / "cache").glob("*.pt")}

    bf16 = run_inprocess(*common, "trainer.precision=bf16-mixed", "sweep_id=bf16")
    after_bf16 = entries()
    fp32 = run_inprocess(*common, "sweep_id=fp32")
    assert len(after_bf16) == 1 and len(entries() - after_bf16) == 1  # its own entry, not bf16's
    again = run_inprocess(*common, "sweep_id=again")
    assert len(entries()) == 2 and again["fp32_top1"] == fp32["fp32_top1"]  # served from its entry
    plain = run_inprocess(*common, "cache.enabled=false", "sweep_id=plain")
    assert fp32["fp32_top1"] == plain["fp32_top1"]
    assert bf16["config_hash"] != fp32["config_hash"]
