"""A method family from outside qaf: a module and a config, nothing else (docs/design.md, "Adding a
method family"). The toy family is a truncated SVD of each selected conv into a layer type of its
own (two convs); it runs through the pipeline, its options are checked like qaf's own, the report
shows it as it declares (its label, its rate, compared only at equal rate), and its runs export an
artifact that reloads to the run's top-1."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from qaf.report.collect import collect_sweep
from qaf.report.pareto import mark_rows, pareto_front
from qaf.report.tables import aggregate

from conftest import run_main

MODULE = '''
from dataclasses import dataclass

import torch
from torch import nn

from qaf.config import ConfigError, option
from qaf.layer_type import LayerType
from qaf.methods.base import DecompositionMethod, DecompositionOptions
from qaf.results import MethodInfo


class SVDConv2d(LayerType):
    """A conv as a (rank x in x kh x kw) conv followed by a 1x1 conv."""

    kind = "toy_plugin_svd_conv2d"  # its own kind: test_layer_types registers "toy_svd_conv2d"
    factorized = True

    def __init__(self, conv, rank):
        super().__init__()
        self.rank = rank
        self.first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, bias=False)
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x):
        return self.second(self.first(x))

    def export_record(self, name, writer):
        return {"rank": self.rank}

    @classmethod
    def from_record(cls, name, record, current, reader):
        return cls(current, record["rank"])  # its sub-convs come back from their own records


@dataclass
class SVDOptions(DecompositionOptions):
    min_rank: int = option(1, low=1)


class TruncatedSVD(DecompositionMethod):
    """Each conv as a (rank x in x kh x kw) conv followed by a 1x1 conv: the rank-r SVD of its weight."""

    name = "toy_svd"
    info = MethodInfo(display="Toy SVD", uses_rate=True)
    Options = SVDOptions
    log_fields = ("rank",)

    def rank(self, conv):
        out, rest = conv.weight.shape[0], conv.weight[0].numel()
        return max(self.min_rank, int(out * rest / (out + rest) / self.rate))

    def check_layers(self, layers):
        for name, conv in layers:
            if self.rank(conv) > min(conv.weight.shape[0], conv.weight[0].numel()):
                raise ConfigError(f"method.min_rank={self.min_rank} is invalid: layer {name} has a lower rank")

    def decompose(self, name, conv, ctx, cache):
        rank, w = self.rank(conv), conv.weight.detach()
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        layer = SVDConv2d(conv, rank)
        with torch.no_grad():
            layer.first.weight.copy_(vh[:rank].reshape(rank, *w.shape[1:]))
            layer.second.weight.copy_((u[:, :rank] * s[:rank]).reshape(*layer.second.weight.shape))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias)
        error = float(torch.linalg.norm(s[rank:]) / torch.linalg.norm(s))
        return layer, {"first": None, "second": None}, {"name": name, "rank": rank, "error": error,
                                                        "cached": False}
'''

CONFIG = '''# @package _global_
defaults:
  - override /policy: qaf
  - _self_
method:
  _target_: toy_svd_plugin.TruncatedSVD
  include: ["layer3.*"]
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The module on sys.path and its config on Hydra's search path; returns the override adding it."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "toy_svd_plugin.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "toy_svd.yaml").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    sys.modules.pop("toy_svd_plugin", None)


TINY = ["data.eval_samples=64", "data.calib_samples=64", "cache.enabled=false", "logger=none", "progress=false"]


def test_a_method_family_from_outside_qaf_runs_and_is_reported_as_it_declares(
        plugin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    grid = '+hydra.sweeper.grid=[{method: toy_svd, rate: "2,4"}, {method: ptq}]'
    status, out, err = run_main(["-m", plugin, "hydra/sweeper=grid", grid, *TINY, "sweep_id=toy"], tmp_path,
                                monkeypatch, capsys)
    assert status == 0, err[-3000:]
    sweep = tmp_path / "multirun_outputs" / "toy"
    metrics = json.loads(next(sweep.glob("*rate=2*/metrics.json")).read_text())
    assert metrics["method"] == "toy_svd" and metrics["policy"] == "qaf"  # the reference policy it chose
    assert metrics["method_info"] == {"display": "Toy SVD", "uses_rate": True, "reference": False, "order": 100,
                                     "variant": "", "rate": None}
    assert [layer["name"] for layer in metrics["layers"]] == [f"layer3.{b}.conv{c}" for b in range(3) for c in (1, 2)]
    assert 0 < metrics["bops_pct"] < 100 and metrics["macs"] < metrics["fp32_macs"]
    rows = aggregate(collect_sweep(sweep))
    assert [(r.label, r.rate) for r in rows] == [("Float", None), ("PTQ", None), ("Toy SVD", 2.0), ("Toy SVD", 4.0)]
    # Judged at matched cost with qaf's own rows: bold exactly where nothing cheaper is more accurate.
    mark_rows(rows)
    front = pareto_front([(r.bops_pct, r.top1, r) for r in rows if not r.is_float])
    assert [r for r in rows if r.mark == "best"] == sorted((r for _, _, r in front), key=rows.index)
    table = (sweep / "table.md").read_text().replace("**", "")  # the sweep's own report (bold marks off)
    assert "| Toy SVD | 4/8 | 2 |" in table and "| Toy SVD | 4/8 | 4 |" in table and "| PTQ | 4/8 | – |" in table


def test_its_options_are_checked_like_qafs_own(plugin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture):
    for override, message in (
            ("+method.min_rank=0", "method.min_rank=0 is invalid: accepted an integer >= 1"),
            ("+method.nosuch=1", "method.nosuch is not an option of method=toy_svd: accepted act_clip, clip, "
                                 "exclude, include, min_rank")):
        status, _, err = run_main([plugin, "method=toy_svd", override, *TINY], tmp_path, monkeypatch, capsys)
        assert status == 2 and err.strip() == f"qaf: config error: {message}"


def test_its_runs_export_and_reload_with_the_runs_top1(plugin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture):
    import torch

    import qaf
    from qaf.data.cifar10 import embedded

    status, _, err = run_main([plugin, "method=toy_svd", *TINY, "sweep_id=toy1", "export=true"], tmp_path,
                              monkeypatch, capsys)
    assert status == 0, err[-3000:]
    run_dir = tmp_path / "multirun_outputs" / "toy1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["export"]["verified"] and "error" not in metrics["export"]
    sys.modules.pop("toy_svd_plugin", None)  # a fresh process: the loader imports the layer's module itself
    loaded = qaf.load(run_dir / "model.qaf.safetensors")
    assert [type(m).__name__ for m in loaded.modules()].count("SVDConv2d") == 6
    correct = 0
    with torch.no_grad():
        for x, y, _ in embedded(eval_samples=64, calib_samples=64).eval_loader():
            correct += int((loaded(x).argmax(1) == y).sum())
    assert round(100 * correct / 64, 4) == metrics["top1"]

