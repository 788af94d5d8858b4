"""The layer-type protocol (qaf/layer_type.py): for every layer type, its cost and storage by hand, its
artifact record and reload (bit for bit) and its ONNX lowering; and a layer type defined outside qaf,
refused before any file is written without the protocol and exported, reloaded and lowered with it."""

from __future__ import annotations

import sys
import textwrap
from collections import Counter, OrderedDict

import pytest
import torch
from torch import nn

from qaf.calib import observing_activations
from qaf.config import ConfigError
from qaf.decomp.layers import CPConv2d, CPLinear
from qaf.decomp.qswd import qswd, weight_to_matrix
from qaf.decomp.qswd_layer import QSWDConv2d, QSWDLinear
from qaf.export import ARTIFACT_NAME, export_run, load, read_metadata, save
from qaf.layer_type import LAYER_TYPES, LayerType
from qaf.metrics.bops import layer_costs
from qaf.metrics.size import size_bytes, storage_entries
from qaf.quant.modules import ActQuantizer, QuantInput, QuantLayer, QuantReLU, quantize_model

onnx = pytest.importorskip("onnx")

INPUT = (4, 6, 6)
W4A8 = {"symmetric": True, "clip": "minmax"}
# kind: (its module in the model below, MACs, BOPs, stored bits), counted by hand on 4 x 6 x 6 inputs.
CASES = {
    # conv 4 -> 8, 3x3, padding 1, 4-bit weights, 8-bit input: 6*6*8 outputs x 4*9 MACs = 10,368; BOPs x 4 x 8.
    # Stored: 288 codes x 4 bits + the weight scale (32) + its input quantizer's scale and zero point (64).
    "quant_layer": ("q", 10_368, 10_368 * 32, 288 * 4 + 32 + 64),
    "act_quantizer": ("q.act", 0, 0, 64),
    "quant_relu": ("relu", 0, 0, 64),
    # QSWD 8 -> 8, 3x3, kernel blocks (64 rows of 9), 4 atoms, 1 non-zero per row, 4-bit codes and dictionary,
    # 8-bit weight and input: one dense conv, 6*6*8 x 8*9 = 20,736 MACs at 8 x 8 bits. Stored: 64 codes x 4,
    # 64 indices x 2 (log2 4), 36 dictionary entries x 4, three grids x 64.
    "qswd_conv2d": ("qswd.module", 20_736, 20_736 * 64, 64 * 4 + 64 * 2 + 36 * 4 + 3 * 64),
    "quant_input": ("qswd", 20_736, 20_736 * 64, 64 * 4 + 64 * 2 + 36 * 4 + 3 * 64 + 64),
    # CP 8 -> 8, 3x3, rank 5, sub-convs at W4A8: 1x1 6*6*5*8 = 1,440, depthwise 6*6*5*9 = 1,620, 1x1 1,440 MACs.
    # Stored: (40 + 45 + 40) codes x 4, three weight scales, three input quantizers.
    "cp_conv2d": ("cp", 4_500, 4_500 * 32, 125 * 4 + 3 * 32 + 3 * 64),
    # CP linear 8 -> 6 (bias), rank 3, at W4A8: 8*3 + 3*6 = 42 MACs. Stored: 42 codes x 4, two weight scales,
    # the bias (6 x 32), two input quantizers.
    "cp_linear": ("cpl", 42, 42 * 32, 42 * 4 + 2 * 32 + 6 * 32 + 2 * 64),
    # QSWD linear 6 -> 5 (bias), row blocks (5 rows of 6), 4 atoms, 1 non-zero, 4-bit codes and dictionary,
    # 8-bit weight, 8 x 8 bits: 30 MACs. Stored: 5 codes x 4, 5 indices x 2, 24 entries x 4, 3 grids, bias.
    "qswd_linear": ("qswdl", 30, 30 * 64, 5 * 4 + 5 * 2 + 24 * 4 + 3 * 64 + 5 * 32),
}


def float_net() -> nn.Module:
    """The float architecture the layer types replace parts of (a float batch norm keeps the 8-bit
    quantizer of ``qswd`` off the 4-bit ReLU output's levels, where ties would round either way)."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        q=nn.Conv2d(4, 8, 3, padding=1, bias=False), relu=nn.ReLU(), bn=nn.BatchNorm2d(8),
        qswd=nn.Conv2d(8, 8, 3, padding=1, bias=False), cp=nn.Conv2d(8, 8, 3, padding=1, bias=False),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), cpl=nn.Linear(8, 6), qswdl=nn.Linear(6, 5))).eval()
    with torch.no_grad():
        for tensor in (model.bn.weight, model.bn.bias, model.bn.running_mean):
            tensor.copy_(torch.randn(8) * 0.3 + (tensor is model.bn.weight))
    return model


def compressed_net() -> nn.Module:
    """``float_net`` with every layer type of qaf in it, calibrated."""
    model = float_net()
    g = torch.Generator().manual_seed(1)
    model.relu = QuantReLU(model.relu, ActQuantizer(4, unsigned=True))
    conv, linear = model.qswd, model.qswdl
    qswd_conv = QSWDConv2d(conv, qswd(weight_to_matrix(conv.weight.detach(), "kernel"), 4, 1, dict_bits=4,
                                      code_bits=4, max_iter=2, generator=g), "kernel")
    model.qswd = QuantInput(qswd_conv, ActQuantizer(8))
    model.cp = CPConv2d(model.cp, [torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g),
                                   torch.randn(9, 5, generator=g)])
    model.cpl = CPLinear(model.cpl, [torch.randn(6, 3, generator=g), torch.randn(8, 3, generator=g)])
    model.qswdl = QSWDLinear(linear, qswd(weight_to_matrix(linear.weight.detach(), "row"), 4, 1, dict_bits=4,
                                          code_bits=4, max_iter=2, generator=g), "row")
    qswd_conv.qaf_bits = model.qswdl.qaf_bits = (8, 8)
    plan = {name: (4, 8) for name in ("q", "cp.pointwise_in", "cp.depthwise", "cp.pointwise_out", "cpl.first",
                                      "cpl.second")}
    quantize_model(model, plan, weight_scheme=W4A8)
    with torch.no_grad(), observing_activations(model):
        model(torch.randn(8, *INPUT, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The compressed model, its artifact reloaded into ``float_net()``, and its ONNX graph."""
    from qaf.export.onnx import export_onnx

    model = compressed_net()
    out = tmp_path_factory.mktemp("layer_types")
    saved = save(model, out / ARTIFACT_NAME)
    loaded = load(saved["path"], model=float_net())
    export_onnx(model, out / "model.onnx", INPUT)
    return model, loaded, read_metadata(saved["path"])["manifest"], onnx.load(str(out / "model.onnx"))


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(f"{path}.")


def test_every_layer_type_of_qaf_is_covered():
    qaf_kinds = {kind for kind, cls in LAYER_TYPES.items() if cls.__module__.startswith("qaf.")}
    assert qaf_kinds == set(CASES)
    model = compressed_net()
    assert {kind: type(model.get_submodule(path)).kind for kind, (path, *_) in CASES.items()} == {k: k for k in CASES}


@pytest.mark.parametrize("kind", list(CASES))
def test_cost_and_storage_by_hand(kind):
    path, macs, bops, bits = CASES[kind]
    model = compressed_net()
    costs = [c for c in layer_costs(model, INPUT) if _under(c.name, path)]
    assert sum(c.macs for c in costs) == macs
    assert sum(c.bops for c in costs) == bops
    assert sum(n * b for name, n, b in storage_entries(model) if _under(name, path)) == bits


def test_the_model_counts_its_layers_and_nothing_else():
    model = compressed_net()
    top = ("q", "relu", "qswd", "cp", "cpl", "qswdl")
    bn_bits, bn_macs = 4 * 8 * 32, 2 * 8 * 6 * 6  # the float batch norm: 4 vectors, a scale and shift per value
    assert size_bytes(model) == -(-(sum(CASES[k][3] for k in CASES if CASES[k][0] in top) + bn_bits) // 8)
    costs = layer_costs(model, INPUT)
    assert sum(c.macs for c in costs) == sum(CASES[k][1] for k in CASES if CASES[k][0] in top) + bn_macs


@pytest.mark.parametrize("kind", list(CASES))
def test_artifact_record_and_reload_are_bit_identical(exported, kind):
    model, loaded, manifest, _ = exported
    path = CASES[kind][0]
    assert {"name": path, "kind": kind}.items() <= next(r for r in manifest["modules"] if r["name"] == path).items()
    layer, back = model.get_submodule(path), loaded.get_submodule(path)
    assert type(back) is type(layer)
    x = torch.randn(3, *INPUT, generator=torch.Generator().manual_seed(2))
    seen: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        expected = model(x)
        hook.remove()
        assert torch.equal(back(seen["x"]).view(-1).view(torch.int32), layer(seen["x"]).view(-1).view(torch.int32))
        assert torch.equal(loaded(x), expected)
    assert size_bytes(back) == size_bytes(layer)
    assert [c for c in layer_costs(loaded, INPUT) if _under(c.name, path)] == [
        c for c in layer_costs(model, INPUT) if _under(c.name, path)]


@pytest.mark.parametrize("kind", list(CASES))
def test_onnx_lowering(exported, kind):
    model, _, _, proto = exported
    path = CASES[kind][0]
    module = model.get_submodule(path)
    ops = Counter(n.op_type for n in proto.graph.node if _under(n.name.split("/")[0], path))
    quantizers = [m for m in module.modules() if isinstance(m, ActQuantizer)]
    weights = [m for m in module.modules() if isinstance(m, (QuantLayer, QSWDConv2d, QSWDLinear))]
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, QSWDConv2d, QSWDLinear))]
    assert ops["QuantizeLinear"] == len(quantizers)
    assert ops["DequantizeLinear"] == len(quantizers) + len(weights)
    assert ops["Conv"] + ops["Gemm"] == len(layers)
    # a grid narrower than its 8-bit type (the 4-bit ReLU output) is clipped to its levels first
    assert ops["Clip"] == sum(q.bits < 8 for q in quantizers)


def test_onnx_graph_computes_what_the_model_does(exported, tmp_path):
    from qaf.export.onnx import onnx_logits, session

    model, _, _, proto = exported
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    x = torch.randn(64, *INPUT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    got = onnx_logits(session(path, level="basic"), x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))  # float rounding


# ---------------------------------------------------------------------- a layer type from outside qaf
TOY = '''
import torch
from torch import nn

from qaf.layer_type import LayerType


def build():
    """The float architecture (the ``model`` node of the stored config names this builder)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def svd_convs(conv, rank):
    """A k x k conv as two convs: k x k to ``rank`` channels, then 1 x 1 (truncated SVD of its weight)."""
    out, cin, kh, kw = conv.weight.shape
    u, s, vh = torch.linalg.svd(conv.weight.detach().reshape(out, -1), full_matrices=False)
    first = nn.Conv2d(cin, rank, (kh, kw), conv.stride, conv.padding, bias=False)
    second = nn.Conv2d(rank, out, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_((s[:rank, None] * vh[:rank]).reshape(rank, cin, kh, kw))
        second.weight.copy_(u[:, :rank, None, None])
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return first, second


class SVDConv2d(nn.Module):
    """Two convs, no export support."""

    def __init__(self, conv, rank):
        super().__init__()
        self.first, self.second = svd_convs(conv, rank)

    def forward(self, x):
        return self.second(self.first(x))


class ExportableSVDConv2d(LayerType):
    """The same layer with the protocol: a kind, its record (the rank) and its rebuild."""

    kind = "toy_svd_conv2d"
    factorized = True

    def __init__(self, conv, rank):
        super().__init__()
        self.rank = rank
        self.first, self.second = svd_convs(conv, rank)

    def forward(self, x):
        return self.second(self.first(x))

    def export_record(self, name, writer):
        return {"rank": self.rank}

    @classmethod
    def from_record(cls, name, record, current, reader):
        return cls(current, record["rank"])  # its sub-convs come back from their own records


class RecordlessSVDConv2d(ExportableSVDConv2d):
    """A layer type that forgot its from_record (it inherits one: a kind of its own and none)."""

    kind = "toy_recordless"
    from_record = LayerType.from_record
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The module above, importable as ``toy_layers`` (outside qaf), with its quantized model."""
    (tmp_path / "toy_layers.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_layers", raising=False)
    for kind in ("toy_svd_conv2d", "toy_recordless"):
        monkeypatch.delitem(LAYER_TYPES, kind, raising=False)
    import toy_layers

    def model(layer_class: str) -> nn.Module:
        net = toy_layers.build()
        net[2] = getattr(toy_layers, layer_class)(net[2], 3)
        quantize_model(net, {"2.first": (4, 8), "2.second": (4, 8)}, weight_scheme=W4A8)
        with torch.no_grad(), observing_activations(net):
            net(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4)))
        return net.eval()

    yield model
    sys.modules.pop("toy_layers", None)


CONFIG = {"model": {"_target_": "toy_layers.build"}}


@pytest.mark.parametrize("layer_class, reason", [("SVDConv2d", "not the architecture's module"),
                                                 ("RecordlessSVDConv2d", "no kind or no from_record")])
def test_a_layer_without_the_protocol_is_refused_before_any_file_is_written(toy, tmp_path, layer_class, reason):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        export_run(toy(layer_class), CONFIG, out, (3, 8, 8), {}, artifact=True)
    message = str(err.value)
    assert "\n" not in message and f"module 2 (toy_layers.{layer_class})" in message and reason in message
    assert "LayerType with a kind, export_record and from_record" in message
    assert not out.exists() or not any(out.iterdir())


def test_a_layer_with_the_protocol_exports_reloads_and_lowers(toy, tmp_path, monkeypatch):
    from qaf.export.onnx import onnx_logits, session

    model = toy("ExportableSVDConv2d")
    result = export_run(model, CONFIG, tmp_path, (3, 8, 8), {"size_bytes": size_bytes(model)}, artifact=True,
                        onnx=True)
    assert result["verified"]
    manifest = read_metadata(result["path"])["manifest"]
    assert manifest["kinds"]["toy_svd_conv2d"] == "toy_layers"
    # A fresh process has not imported the module: the loader imports it from the manifest.
    monkeypatch.delitem(LAYER_TYPES, "toy_svd_conv2d")
    monkeypatch.delitem(sys.modules, "toy_layers")
    loaded = load(result["path"])
    assert type(loaded[2]).__name__ == "ExportableSVDConv2d" and isinstance(loaded[2], LayerType)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
    assert size_bytes(loaded) == size_bytes(model) and layer_costs(loaded, (3, 8, 8)) == layer_costs(model, (3, 8, 8))
    graph = onnx.load(result["onnx_path"]).graph
    ops = Counter(n.op_type for n in graph.node if n.name.startswith("2."))
    assert ops == {"QuantizeLinear": 2, "DequantizeLinear": 4, "Conv": 2}
    got = onnx_logits(session(result["onnx_path"], level="basic"), x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
