"""``model.qaf.safetensors``: a compressed model as integer codes, and back (``qaf.load``).

The file is a plain safetensors file (docs/export.md describes it in full):

- every layer type (:class:`qaf.layer_type.LayerType`) of the model has a record in the manifest:
  its ``kind`` (the registry key the loader finds its class by) and what its ``export_record``
  returned; the tensors it encodes are stored under its name, quantized tensors as integer codes
  ``u = q - qmin`` (``q`` the grid code), bit-packed for 1..8 bits (code ``i`` in bits
  ``[i b, (i + 1) b)`` of a little-endian bit stream, so two 4-bit codes share a byte),
  ``u - 32768`` in int16 for 9..16 bits, with their grids' scales and zero points;
- float leftovers (batch norm, biases, float layers, the sub-convs of a layer type that stores
  nothing itself) under their ``state_dict`` names;
- metadata (JSON strings): ``config`` (the run's resolved config), ``manifest`` (the records,
  shared modules, bit widths, how each tensor is encoded), ``metrics`` (a few figures of the run).

:func:`load` rebuilds the module from the file alone: the architecture from the stored config
(pretrained weights off), then each record's ``from_record`` (parents first), then the float
leftovers, so the model computes exactly what the exported one did. :func:`save` runs the same
rebuild on what it is about to write and refuses, in one line and before writing anything, a model
it could not rebuild (a module that is neither part of the architecture nor a layer type).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from qaf.config import ConfigError
from qaf.layer_type import LayerType, exportable, layer_type
from qaf.quant.modules import set_submodule
from qaf.quant.uniform import Grid

FORMAT = "qaf.export"
FORMAT_VERSION = 2
ARTIFACT_NAME = "model.qaf.safetensors"
#: Figures of the run copied into the metadata.
METRIC_KEYS = ("method", "model", "data", "bits", "act_bits", "rate", "seed", "policy", "top1", "top5",
               "eval_samples", "bops_pct", "macs", "size_bytes", "fp32_size_bytes", "config_hash")


# ---------------------------------------------------------------------------------------- codes
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


class _Writer:
    """Collects tensors and their code entries (:class:`qaf.layer_type.TensorWriter`)."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.entries: dict[str, dict[str, Any]] = {}

    def float(self, name: str, tensor: Tensor) -> None:
        self.tensors[name] = tensor.detach().cpu().contiguous().clone()

    def codes(self, name: str, q: Tensor, qmin: int, qmax: int) -> None:
        bits = code_bits(qmin, qmax)
        stored, encoding = encode(q.detach().cpu().long() - qmin, bits)
        if stored is not None:
            self.tensors[name] = stored
        self.entries[name] = {"bits": bits, "qmin": int(qmin), "encoding": encoding, "shape": list(q.shape)}

    def grid(self, prefix: str, grid: Grid, always_zero_point: bool = False) -> list[int]:
        self.float(f"{prefix}_scale", grid.scale.float())
        has_zp = always_zero_point or bool((grid.zero_point != 0).any())
        if has_zp:
            self.float(f"{prefix}_zero_point", grid.zero_point.float())
        return [int(grid.qmin), int(grid.qmax), int(has_zp)]


class _Reader:
    """Reads tensors back (:class:`qaf.layer_type.TensorReader`), remembering which were used."""

    def __init__(self, tensors: Mapping[str, Tensor], entries: dict[str, dict[str, Any]]):
        self.tensors, self.entries = tensors, entries
        self.used: set[str] = set()

    def float(self, name: str) -> Tensor:
        self.used.add(name)
        return self.tensors[name]

    def codes(self, name: str) -> Tensor:
        entry = self.entries[name]
        stored = None if entry["encoding"] == "none" else self.float(name)
        return decode(stored, entry["encoding"], entry["bits"], entry["shape"]) + entry["qmin"]

    def grid(self, prefix: str, spec: list[int]) -> Grid:
        qmin, qmax, has_zp = spec
        scale = self.float(f"{prefix}_scale")
        zp = self.float(f"{prefix}_zero_point") if has_zp else torch.zeros_like(scale)
        return Grid(scale, zp, qmin, qmax)


# ------------------------------------------------------------------------------------ export
def _owns(module: nn.Module) -> bool:
    """A layer type with a storage stores its sub-modules' tensors itself."""
    return isinstance(module, LayerType) and module.storage() is not None


def _refusal(name: str, module: nn.Module, reason: str) -> ConfigError:
    cls = type(module)
    return ConfigError(f"cannot export module {name} ({cls.__module__}.{cls.__qualname__}): {reason}; a module "
                       f"of the artifact must be the architecture's or a qaf.layer_type.LayerType with a kind, "
                       f"export_record and from_record (docs/design.md, Adding a layer type)")


def export_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the manifest that describe ``model`` (see the module docstring)."""
    from qaf.models.torchvision_models import relus_split

    w = _Writer()
    records, kinds = [], {}
    for name, m in model.named_modules():  # parents first; a shared module once, at its first path
        if isinstance(m, LayerType):
            if not exportable(type(m)):
                raise _refusal(name, m, "its layer type has no kind or no from_record")
            records.append({"name": name, "kind": m.kind, **m.export_record(name, w)})
            kinds[m.kind] = type(m).__module__
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    owners: list[str] = []
    for name, m in model.named_modules(remove_duplicate=False):
        path = first.setdefault(id(m), name)
        if path != name and not any(name.startswith(f"{a}.") for a in aliases):
            aliases[name] = path  # another path to a shared module (e.g. a quantizer two layers read)
        if _owns(m):
            owners.append(f"{name}." if name else "")
    for key, tensor in model.state_dict().items():
        if not key.startswith(tuple(owners)) and tensor.is_floating_point():
            w.float(key, tensor)  # float leftovers: every tensor no record stores
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "split_shared_relus": relus_split(model),
                "kinds": kinds, "modules": records, "aliases": aliases,
                "qaf_bits": {name: list(m.qaf_bits) for name, m in model.named_modules() if hasattr(m, "qaf_bits")},
                "codes": w.entries}
    return w.tensors, manifest


def rebuild(manifest: dict[str, Any], tensors: Mapping[str, Tensor], model: nn.Module) -> nn.Module:
    """Fill the float architecture ``model`` (in place) from a manifest and its tensors.

    Raises
    ------
    ValueError
        Tensors that neither the manifest nor the architecture knows, or that the file lacks.
    """
    from qaf.models.torchvision_models import split_shared_relus

    if manifest["split_shared_relus"]:
        split_shared_relus(model)
    r = _Reader(tensors, manifest["codes"])
    for record in manifest["modules"]:
        name, cls = record["name"], layer_type(record["kind"], manifest["kinds"].get(record["kind"]))
        try:
            layer = cls.from_record(name, record, model.get_submodule(name), r)
        except (AttributeError, KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"module {name} ({record['kind']}) cannot be rebuilt: {type(err).__name__}: {err}") from err
        set_submodule(model, name, layer)
    for alias, name in manifest["aliases"].items():
        set_submodule(model, alias, model.get_submodule(name))
    floats = {key: tensors[key] for key in tensors.keys() if key not in r.used}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    owners = tuple(f"{n}." for n, m in model.named_modules() if _owns(m))
    state = model.state_dict()
    missing = [k for k in missing if not k.startswith(owners) and state[k].is_floating_point()]
    if unexpected or missing:
        raise ValueError(f"tensors neither the manifest nor the architecture knows: {unexpected[:5]}; "
                         f"tensors the file lacks: {missing[:5]}")
    bits = manifest["qaf_bits"]
    for name, m in model.named_modules():  # the bit widths the BOPs count reads, as exported
        if name in bits:
            m.qaf_bits = tuple(bits[name])
        elif hasattr(m, "qaf_bits"):
            del m.qaf_bits
    return model.eval()


def _unrebuildable(model: nn.Module, architecture: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module of ``model`` the loader cannot rebuild: neither a layer type, nor inside one
    (whose ``from_record`` rebuilds its inside), nor the architecture's module at its path."""
    built = {name: type(m) for name, m in architecture.named_modules(remove_duplicate=False)}
    inside: list[str] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if name.startswith(tuple(inside)):
            continue
        if isinstance(m, LayerType):
            inside.append(f"{name}.")
        elif built.get(name) is not type(m):
            return name, m
    return None


def _check_rebuild(model: nn.Module, manifest: dict[str, Any], tensors: dict[str, Tensor], architecture: nn.Module,
                   input_size: tuple[int, ...] | None) -> bool:
    """Rebuild ``architecture`` from what :func:`save` is about to write: every module of ``model``
    must come back as its class, and with ``input_size``, the logits bit for bit (then True)."""
    rebuilt = rebuild(json.loads(json.dumps(manifest)), tensors, architecture)
    built = dict(rebuilt.named_modules(remove_duplicate=False))
    for name, module in model.named_modules(remove_duplicate=False):
        if type(built.get(name)) is not type(module):
            raise _refusal(name, module, f"the loader rebuilds it as {type(built.get(name)).__name__}")
    if input_size is None:
        return False
    reference = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x), rebuilt(x)
    if not torch.equal(expected, got):
        raise RuntimeError(f"export: the rebuilt model's logits differ from the exported one's "
                           f"(max |diff| {float((expected - got).abs().max()):.3g})")
    return True


def save(model: nn.Module, path: str | Path, config: dict[str, Any] | None = None,
         metrics: Mapping[str, Any] | None = None, input_size: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Write ``model`` (compressed or not) to a ``.qaf.safetensors`` file.

    Before anything is written, the model is rebuilt from the tensors and manifest as :func:`load`
    would (when the config names a model builder): a module it cannot rebuild raises a
    ``ConfigError`` naming it.

    Parameters
    ----------
    model : nn.Module
        The model as evaluated (its tensors are read, not changed).
    path : path
        Output file.
    config : dict, optional
        The run's resolved config (``metrics.json["config"]``); its ``model`` node is how
        :func:`load` builds the architecture.
    metrics : mapping, optional
        The run's metrics (a few figures are copied into the metadata).
    input_size : tuple of int, optional
        ``(C, H, W)``: also check that the rebuilt model gives the same logits bit for bit on two
        random images (raises ``RuntimeError`` otherwise).

    Returns
    -------
    dict
        ``path``, ``bytes`` (file), ``payload_bytes`` (tensor data), ``header_bytes``
        (8-byte length + JSON header with the metadata), ``tensors``, ``verified`` (the logits check ran).
    """
    from safetensors.torch import save_file

    import qaf
    from qaf.models.torchvision_models import relus_split, split_shared_relus

    config = dict(config or {})
    architecture = build_architecture(config) if "_target_" in (config.get("model") or {}) else None
    if architecture is not None:
        if relus_split(model):
            split_shared_relus(architecture)
        found = _unrebuildable(model, architecture)
        if found is not None:
            raise _refusal(*found, "it is not the architecture's module at that path")
    tensors, manifest = export_tensors(model)
    verified = architecture is not None and _check_rebuild(model, manifest, tensors, architecture, input_size)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "qaf_version": qaf.__version__,
                "torch_version": torch.__version__, "manifest": json.dumps(manifest, separators=(",", ":")),
                "config": json.dumps(config, separators=(",", ":"), default=str),
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
            "tensors": len(tensors), "verified": verified}


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

    meta = read_metadata(path)
    manifest = meta["manifest"]
    if int(manifest.get("format_version", 0)) != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {manifest.get('format_version')} (this qaf reads "
                         f"{FORMAT_VERSION}): export the run again with `python -m qaf.export RUN_DIR`")
    model = (model if model is not None else build_architecture(meta["config"])).cpu().eval()
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    try:
        return rebuild(manifest, tensors, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
