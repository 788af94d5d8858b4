"""``model.qaf.safetensors``: a compressed model as integer codes, and back (``qaf.load``).

The file is a plain safetensors file (docs/export.md describes it in full):

- every quantized tensor as its integer codes ``u = q - qmin`` (``q`` the grid code), bit-packed
  for 1..8 bits (code ``i`` in bits ``[i b, (i + 1) b)`` of a little-endian bit stream, so two
  4-bit codes share a byte), ``u - 32768`` in int16 for 9..16 bits; with its grid's scale and zero
  point (float32, zero point omitted when 0, as the storage model counts it);
- CP factors are the weights of the three quantized sub-convs, stored as codes like any other;
- QSWD layers as their code values, dictionary codes and atom indices (packed at
  ``ceil(log2 k)`` bits, or an n x k bitmap, or nothing for dense codes: the cheapest, as
  ``QSWDConv2d.storage`` counts them), with their three grids;
- float leftovers (batch norm, biases, float layers) under their ``state_dict`` names;
- metadata (JSON strings): ``config`` (the run's resolved config), ``manifest`` (what each module
  was and how each tensor is encoded), ``metrics`` (a few figures of the run).

:func:`load` rebuilds the module from the file alone: the architecture from the stored config
(pretrained weights off), the qaf modules from the manifest, every tensor from its codes, so the
model computes exactly what the exported one did (same modules, bit-identical tensors).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qaf.quant.modules import ActQuantizer, QuantInput, QuantLayer, QuantReLU, set_submodule
from qaf.quant.uniform import Grid

log = logging.getLogger("qaf")

FORMAT = "qaf.export"
FORMAT_VERSION = 1
ARTIFACT_NAME = "model.qaf.safetensors"
#: Figures of the run copied into the metadata.
METRIC_KEYS = ("method", "model", "data", "bits", "act_bits", "rate", "seed", "policy", "top1", "top5",
               "eval_samples", "bops_pct", "macs", "size_bytes", "fp32_size_bytes", "config_hash")


# ---------------------------------------------------------------------------------------- codes
def grid_codes(grid: Grid, x: Tensor) -> Tensor:
    """The integer codes ``q`` (as floats) that ``grid(x)`` dequantizes: same ops as ``Grid.__call__``."""
    v = x / grid.scale
    if bool(grid._offset.any()):
        v = v + grid._offset
    return torch.round(v).add_(grid._zp_int).clamp_(grid.qmin, grid.qmax)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q - zero_point) * scale`` in ``dtype``: bit for bit what ``Grid.__call__`` returns."""
    return codes.to(dtype, copy=True).sub_(zero_point).mul_(scale)


def code_bits(qmin: int, qmax: int) -> int:
    """Bits of the codes ``0 .. qmax - qmin``."""
    return max(int(qmax - qmin), 0).bit_length()


def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers ``< 2**bits`` (1..8 bits) into a little-endian bit stream."""
    u = np.ascontiguousarray(u, dtype=np.uint16).reshape(-1)
    if bits == 8:
        return u.astype(np.uint8)
    planes = np.empty((u.size, bits), dtype=np.uint8)
    for k in range(bits):
        planes[:, k] = (u >> k) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` (``count`` integers, int64)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return packed[:count].astype(np.int64)
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    out = np.zeros(count, dtype=np.int64)
    for k in range(bits):
        out |= planes[:, k].astype(np.int64) << k
    return out


def encode(u: Tensor, bits: int) -> tuple[Tensor | None, str]:
    """Store non-negative integer codes at ``bits``: (tensor or None for 0 bits, encoding name)."""
    u = u.detach().cpu().long().reshape(-1)
    if bits == 0:
        return None, "none"
    if bits <= 8:
        return torch.from_numpy(pack_codes(u.numpy(), bits)), "packed"
    if bits <= 16:
        return (u - 32768).to(torch.int16), "int16"
    return u.to(torch.int32), "int32"


def decode(stored: Tensor | None, encoding: str, bits: int, shape: list[int]) -> Tensor:
    """Inverse of :func:`encode`: int64 codes of ``shape``."""
    count = math.prod(shape)
    if encoding == "none":
        return torch.zeros(shape, dtype=torch.int64)
    assert stored is not None
    if encoding == "packed":
        return torch.from_numpy(unpack_codes(stored.numpy(), bits, count)).reshape(shape)
    if encoding == "int16":
        return (stored.long() + 32768).reshape(shape)
    if encoding == "int32":
        return stored.long().reshape(shape)
    raise ValueError(f"unknown code encoding {encoding!r}")


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality of two float tensors (distinguishes -0.0 from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


class _Writer:
    """Collects tensors and their manifest entries."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.entries: dict[str, dict[str, Any]] = {}

    def float(self, name: str, tensor: Tensor) -> None:
        self.tensors[name] = tensor.detach().cpu().contiguous().clone()

    def codes(self, name: str, q: Tensor, qmin: int, qmax: int) -> None:
        """Grid codes ``q`` (integer-valued) in ``qmin..qmax``."""
        bits = code_bits(qmin, qmax)
        stored, encoding = encode(q.detach().cpu().long() - qmin, bits)
        if stored is not None:
            self.tensors[name] = stored
        self.entries[name] = {"bits": bits, "qmin": int(qmin), "encoding": encoding, "shape": list(q.shape)}

    def integers(self, name: str, values: Tensor, bits: int) -> None:
        """Non-negative integers (indices) at ``bits``."""
        self.codes(name, values, 0, (1 << bits) - 1)

    def grid(self, prefix: str, grid: Grid, always_zero_point: bool = False) -> list[int]:
        """Scale (and zero point) tensors of ``grid``; returns ``[qmin, qmax, has zero point]``."""
        self.float(f"{prefix}_scale", grid.scale.float())
        has_zp = always_zero_point or bool((grid.zero_point != 0).any())
        if has_zp:
            self.float(f"{prefix}_zero_point", grid.zero_point.float())
        return [int(grid.qmin), int(grid.qmax), int(has_zp)]

    def act_grid(self, name: str, grid: Grid) -> list[int]:
        """A per-tensor activation grid as one ``[scale, zero_point]`` tensor (``name.scale_zero_point``)."""
        self.float(f"{name}.scale_zero_point", torch.stack([grid.scale.float(), grid.zero_point.float()]))
        return [int(grid.qmin), int(grid.qmax)]


class _Reader:
    def __init__(self, handle: Any, entries: dict[str, dict[str, Any]]):
        self.handle, self.entries = handle, entries
        self.used: set[str] = set()

    def float(self, name: str) -> Tensor:
        self.used.add(name)
        return self.handle.get_tensor(name)

    def codes(self, name: str) -> Tensor:
        """Grid codes ``q`` (int64, with ``qmin`` added back)."""
        entry = self.entries[name]
        stored = None
        if entry["encoding"] != "none":
            self.used.add(name)
            stored = self.handle.get_tensor(name)
        return decode(stored, entry["encoding"], entry["bits"], entry["shape"]) + entry["qmin"]

    def grid(self, prefix: str, spec: list[int]) -> Grid:
        qmin, qmax, has_zp = spec
        scale = self.float(f"{prefix}_scale")
        zp = self.float(f"{prefix}_zero_point") if has_zp else torch.zeros_like(scale)
        return Grid(scale, zp, qmin, qmax)

    def act_grid(self, name: str, spec: list[int]) -> Grid:
        pair = self.float(f"{name}.scale_zero_point")
        return Grid(pair[0].clone(), pair[1].clone(), *spec)


# ------------------------------------------------------------------------------------ export
def _quantizer_record(name: str, q: ActQuantizer, w: _Writer) -> dict[str, Any]:
    kind = "unsigned" if q.unsigned else "symmetric" if q.symmetric else "affine"
    record: dict[str, Any] = {"name": name, "bits": q.bits, "scheme": kind, "clip": q.clip, "p": q.p, "mode": q.mode}
    if q.grid is not None:
        if q.grid.scale.dim() != 0:
            raise NotImplementedError(f"activation quantizer {name} has a per-channel grid")
        record["grid"] = w.act_grid(name, q.grid.to("cpu"))
    return record


def _quant_layer_record(name: str, m: QuantLayer, act: str | None, w: _Writer) -> dict[str, Any]:
    layer = m.layer
    weight = layer.weight.detach().cpu()
    record: dict[str, Any] = {"name": name, "kind": "quant_layer", "w_bits": m.w_bits, "a_bits": m.a_bits,
                              "act": act, "weight": "float"}
    if m.bias_correction:
        record["bias_correction"] = True
    if layer.bias is not None:
        record["bias"] = True
    grid = m.weight_grid
    if grid is not None:
        grid = grid.to("cpu")
        offset = getattr(m, "qaf_weight_offset", None) if m.bias_correction else None  # a loaded model's
        if not m.bias_correction:
            source = weight
        elif offset is None:  # LAPQ: the weight is grid(weight_fp) shifted per channel (correct_mean)
            source = m.weight_fp.detach().cpu()
        else:
            source = weight + offset.cpu()
        q = grid_codes(grid, source)
        w_q = dequantize(q, grid.scale, grid.zero_point, weight.dtype)
        if m.bias_correction:
            if offset is None:  # the very tensor correct_mean subtracts
                dims = list(range(1, weight.dim()))
                offset = w_q.mean(dims, keepdim=True) - source.mean(dims, keepdim=True)
            offset = offset.cpu()
            w_q = w_q - offset
        if _same_bits(w_q, weight):
            record["weight"] = "codes"
            record["grid"] = w.grid(f"{name}.weight", grid)
            w.codes(f"{name}.weight_codes", q, grid.qmin, grid.qmax)
            if offset is not None:
                w.float(f"{name}.weight_offset", offset)
        else:
            log.warning("export: %s: the weight is not its grid's dequantized codes bit for bit; stored in float",
                        name)
    if record["weight"] == "float":
        w.float(f"{name}.weight", weight)
    if layer.bias is not None:
        w.float(f"{name}.bias", layer.bias)
    return record


def _qswd_record(name: str, m: nn.Module, w: _Writer) -> dict[str, Any]:
    from qaf.decomp.qswd_layer import QSWDConv2d

    codes = m.integer_codes()
    (n, s), k = m.index.shape, m.dictionary.shape[0]
    record: dict[str, Any] = {"name": name, "kind": "qswd_conv2d" if isinstance(m, QSWDConv2d) else "qswd_linear",
                              "block": m.block, "unit_codes": m.unit_codes, "n": n, "s": s, "k": k, "grids": {},
                              "bias": m.bias is not None}
    for part in ("values", "dictionary", "weight"):
        grid = m.grid(part)
        if grid is not None:
            record["grids"][part] = w.grid(f"{name}.{part}", grid.to("cpu"), always_zero_point=True)
    for part in ("dictionary",) if m.unit_codes else ("values", "dictionary"):
        grid = m.grid(part)
        tensor = getattr(m, part).detach().cpu()
        if grid is None:
            w.float(f"{name}.{part}", tensor)
            record[part] = "float"
            continue
        grid = grid.to("cpu")
        q = codes[part].cpu()
        if not _same_bits(dequantize(q, grid.scale, grid.zero_point, tensor.dtype), grid(tensor)):
            q = grid_codes(grid, tensor)  # integer_codes rounds a zero-free grid differently
        w.codes(f"{name}.{part}_codes", q, grid.qmin, grid.qmax)
        record[part] = "codes"
    index = codes["index"].cpu()
    index_bits = 0 if s == k else math.ceil(math.log2(k))
    ascending = bool((index[:, 1:] > index[:, :-1]).all()) if s > 1 else True
    if index_bits == 0 and bool((index == torch.arange(k)).all()):
        record["index"] = "dense"
    elif index_bits * s > k and ascending:
        bitmap = torch.zeros(n, k, dtype=torch.long).scatter_(1, index, 1)
        w.integers(f"{name}.bitmap", bitmap, 1)
        record["index"] = "bitmap"
    else:
        w.integers(f"{name}.index", index, max(index_bits, code_bits(0, k - 1)))
        record["index"] = "packed"
    if m.bias is not None:
        w.float(f"{name}.bias", m.bias)
    return record


def _split_relus(model: nn.Module) -> bool:
    import torchvision

    blocks = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    return any(isinstance(m, blocks) and "relu" not in m._modules for m in model.modules())


def export_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the manifest that describe ``model`` (see the module docstring)."""
    from qaf.decomp.layers import CPConv2d, CPLinear
    from qaf.decomp.qswd_layer import _QSWDLayer

    w = _Writer()
    all_names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        all_names.setdefault(id(module), []).append(name)
    canonical = {id(m): name for name, m in model.named_modules()}
    quantizers = [_quantizer_record(name, m, w) for name, m in model.named_modules() if isinstance(m, ActQuantizer)]

    def act_name(module: nn.Module) -> str | None:
        if isinstance(module, ActQuantizer):
            return canonical[id(module)]
        if isinstance(module, nn.Identity):
            return None
        raise NotImplementedError(f"cannot export an input module of type {type(module).__name__}")

    modules: list[dict[str, Any]] = []
    covered: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            modules.append(_quant_layer_record(name, m, act_name(m.act), w))
            covered.append(name)
        elif isinstance(m, _QSWDLayer):
            modules.append(_qswd_record(name, m, w))
            covered.append(name)
        elif isinstance(m, CPConv2d):
            modules.append({"name": name, "kind": "cp_conv2d", "rank": m.pointwise_in.weight.shape[0]
                            if isinstance(m.pointwise_in, nn.Conv2d) else m.pointwise_in.layer.weight.shape[0]})
        elif isinstance(m, CPLinear):
            first = m.first.layer if isinstance(m.first, QuantLayer) else m.first
            modules.append({"name": name, "kind": "cp_linear", "rank": first.weight.shape[0]})
        elif isinstance(m, QuantReLU):
            modules.append({"name": name, "kind": "quant_relu", "act": act_name(m.act)})
        elif isinstance(m, QuantInput):
            modules.append({"name": name, "kind": "quant_input", "act": act_name(m.act)})
        elif isinstance(m, ActQuantizer):
            covered += all_names[id(m)]
        elif name and callable(getattr(m, "storage", None)):
            raise NotImplementedError(f"cannot export module {name} of type {type(m).__name__}")
    prefixes = tuple(f"{c}." for c in covered)
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefixes) and tensor.is_floating_point():
            w.float(key, tensor)  # float leftovers: every tensor not named by a record
    # Bit widths the BOPs count reads (module.qaf_bits), less those the rebuilt modules imply.
    implied = {f"{rec['name']}.layer": [rec["w_bits"], rec["a_bits"]] for rec in modules if rec["kind"] == "quant_layer"}
    bn_bits = next((list(m.qaf_bits) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                    and hasattr(m, "qaf_bits")), None)
    qaf_bits = {}
    for name, m in model.named_modules():
        bits = list(getattr(m, "qaf_bits", ())) or None
        default = bn_bits if isinstance(m, nn.BatchNorm2d) else implied.get(name)
        if bits != default:
            qaf_bits[name] = bits
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "split_shared_relus": _split_relus(model),
                "bn_bits": bn_bits, "qaf_bits": qaf_bits, "quantizers": quantizers, "modules": modules,
                "codes": w.entries}
    return w.tensors, manifest


def save(model: nn.Module, path: str | Path, config: dict[str, Any] | None = None,
         metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (compressed or not) to a ``.qaf.safetensors`` file.

    Parameters
    ----------
    model : nn.Module
        The model as evaluated (its tensors are read, not changed).
    path : path
        Output file.
    config : dict, optional
        The run's resolved config (``metrics.json["config"]``); its ``model`` node is how
        :func:`load` builds the architecture.
    metrics : dict, optional
        The run's metrics (a few figures are copied into the metadata).

    Returns
    -------
    dict
        ``path``, ``bytes`` (file), ``payload_bytes`` (tensor data), ``header_bytes``
        (8-byte length + JSON header with the metadata), ``tensors``.
    """
    from safetensors.torch import save_file

    import qaf

    tensors, manifest = export_tensors(model)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "qaf_version": qaf.__version__,
                "torch_version": torch.__version__, "manifest": json.dumps(manifest, separators=(",", ":")),
                "config": json.dumps(config or {}, separators=(",", ":"), default=str),
                "metrics": json.dumps({k: metrics[k] for k in METRIC_KEYS if k in metrics} if metrics else {},
                                      separators=(",", ":"), default=str)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    size = path.stat().st_size
    return {"path": str(path), "bytes": size, "payload_bytes": payload, "header_bytes": size - payload,
            "tensors": len(tensors)}


# -------------------------------------------------------------------------------------- load
def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a ``.qaf.safetensors`` file, JSON fields decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qaf export (metadata format={meta.get('format')!r})")
    for key in ("manifest", "config", "metrics"):
        meta[key] = json.loads(meta.get(key) or "{}")
    return meta


def build_architecture(config: dict[str, Any]) -> nn.Module:
    """The float architecture of a run's config, without downloading weights (they are overwritten)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = dict(config.get("model") or {})
    if "_target_" not in node:
        raise ValueError("the stored config has no model._target_: pass model= to qaf.load")
    if "pretrained" in node:
        node["pretrained"] = False
    if "checkpoint" in node:
        node["checkpoint"] = None
    return instantiate(OmegaConf.create(node)).eval()


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the compressed model stored in a ``.qaf.safetensors`` file.

    Parameters
    ----------
    path : path
        A file written by :func:`save` (``model.qaf.safetensors`` of a run with ``export=true``).
    model : nn.Module, optional
        The float architecture to fill (default: built from the stored config, pretrained off).

    Returns
    -------
    nn.Module
        The model in eval mode on the CPU, computing what the exported model computed.
    """
    from safetensors import safe_open

    from qaf.decomp.layers import CPConv2d, CPLinear
    from qaf.models.torchvision_models import split_shared_relus

    meta = read_metadata(path)
    manifest = meta["manifest"]
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest['format_version']} is newer than this qaf reads")
    model = (model if model is not None else build_architecture(meta["config"])).cpu().eval()
    if manifest.get("split_shared_relus"):
        split_shared_relus(model)
    with safe_open(str(path), framework="pt") as handle:
        r = _Reader(handle, manifest["codes"])
        quantizers = {rec["name"]: _load_quantizer(rec, r) for rec in manifest["quantizers"]}

        def act(name: str | None) -> nn.Module:
            return nn.Identity() if name is None else quantizers[name]

        records = sorted(manifest["modules"], key=lambda rec: rec["name"].count("."))  # parents first
        for rec in records:
            name, kind = rec["name"], rec["kind"]
            current = model.get_submodule(name)
            if kind == "cp_conv2d":
                kh, kw = current.kernel_size
                zeros = [current.weight.new_zeros(n, rec["rank"]) for n in
                         (current.out_channels, current.in_channels, kh * kw)]
                set_submodule(model, name, CPConv2d(current, zeros))
            elif kind == "cp_linear":
                shape = current.weight.shape
                zeros = [current.weight.new_zeros(shape[0], rec["rank"]), current.weight.new_zeros(shape[1], rec["rank"])]
                set_submodule(model, name, CPLinear(current, zeros))
            elif kind == "quant_relu":
                set_submodule(model, name, QuantReLU(current, act(rec["act"])))
            elif kind == "quant_input":
                set_submodule(model, name, QuantInput(current, act(rec["act"])))
            elif kind == "quant_layer":
                set_submodule(model, name, _load_quant_layer(rec, current, act(rec["act"]), r))
            elif kind in ("qswd_conv2d", "qswd_linear"):
                set_submodule(model, name, _load_qswd(rec, current, r))
            else:
                raise ValueError(f"{path}: unknown module kind {kind!r}")
        # Float leftovers: every tensor no record used, under its state_dict name.
        floats = {key: r.float(key) for key in handle.keys() if key not in r.used}
    _, unexpected = model.load_state_dict(floats, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors neither the manifest nor the architecture knows: {unexpected[:5]}")
    _restore_bits(model, manifest)
    return model.eval()


def _restore_bits(model: nn.Module, manifest: dict[str, Any]) -> None:
    """``module.qaf_bits`` (read by the BOPs count) as the exported model had them."""
    bn_bits = manifest.get("bn_bits")
    if bn_bits is not None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.qaf_bits = tuple(bn_bits)
    for name, bits in manifest.get("qaf_bits", {}).items():
        module = model.get_submodule(name)
        if bits is not None:
            module.qaf_bits = tuple(bits)
        elif hasattr(module, "qaf_bits"):
            del module.qaf_bits


def _load_quantizer(rec: dict[str, Any], r: _Reader) -> ActQuantizer:
    q = ActQuantizer(rec["bits"], clip=rec["clip"], symmetric=rec["scheme"] == "symmetric",
                     unsigned=rec["scheme"] == "unsigned", p=rec["p"])
    if rec.get("grid") is not None:
        q.set_grid(r.act_grid(rec["name"], rec["grid"]))
    q._mode = rec["mode"] if rec["mode"] != "observe" else "off"
    return q


def _load_quant_layer(rec: dict[str, Any], layer: nn.Module, act: nn.Module, r: _Reader) -> QuantLayer:
    name = rec["name"]
    with torch.no_grad():
        if rec["weight"] == "codes":
            grid = r.grid(f"{name}.weight", rec["grid"])
            weight = dequantize(r.codes(f"{name}.weight_codes"), grid.scale, grid.zero_point, layer.weight.dtype)
            offset = r.float(f"{name}.weight_offset") if rec.get("bias_correction") else None
            if offset is not None:
                weight = weight - offset
        else:
            grid, offset, weight = None, None, r.float(f"{name}.weight")
        layer.weight.copy_(weight)
        if rec.get("bias"):
            layer.bias.copy_(r.float(f"{name}.bias"))
    wrapped = QuantLayer(layer, rec["w_bits"], rec["a_bits"], weight_grid=grid, fit_weight=False, act=act)
    wrapped.bias_correction = bool(rec.get("bias_correction"))
    if offset is not None:
        wrapped.qaf_weight_offset = offset  # the weight is its codes minus this (re-export needs it)
    return wrapped


def _load_qswd(rec: dict[str, Any], layer: nn.Module, r: _Reader) -> nn.Module:
    from qaf.decomp.qswd import QSWDResult
    from qaf.decomp.qswd_layer import QSWDConv2d, QSWDLinear

    name, n, s, k = rec["name"], rec["n"], rec["s"], rec["k"]
    grids = {part: r.grid(f"{name}.{part}", spec) for part, spec in rec["grids"].items()}

    def part(key: str) -> Tensor:
        if rec[key] == "float":
            return r.float(f"{name}.{key}")
        grid = grids[key]
        return dequantize(r.codes(f"{name}.{key}_codes"), grid.scale, grid.zero_point)

    if rec["index"] == "dense":
        index = torch.arange(k).expand(n, k).clone()
    elif rec["index"] == "bitmap":
        bitmap = r.codes(f"{name}.bitmap").bool()
        index = torch.nonzero(bitmap)[:, 1].reshape(n, s)
    else:
        index = r.codes(f"{name}.index")
    dictionary = part("dictionary")
    values = torch.ones(n, s, dtype=dictionary.dtype) if rec["unit_codes"] else part("values")
    result = QSWDResult(index, values, dictionary, grids.get("values"), grids.get("dictionary"), rec["unit_codes"],
                        0.0, 0, 0)
    if rec["kind"] == "qswd_conv2d":
        out = QSWDConv2d(layer, result, rec["block"], weight_bits=None)
    else:
        out = QSWDLinear(layer, result, rec["block"], weight_bits=None)
    if "weight" in grids:
        out._set_grid("weight", grids["weight"])
    out._cache = None
    if rec["bias"]:
        with torch.no_grad():
            out.bias.copy_(r.float(f"{name}.bias"))
    return out
