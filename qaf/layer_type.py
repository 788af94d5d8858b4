"""Layer types: what a module that a method puts into a model tells the rest of qaf about itself.

A method replaces parts of a float model with its own modules (quantized convs, CP layers, QSWD
layers, activation quantizers, ...). The BOPs count, the stored size, the artifact and its loader
and the ONNX export do not know these classes: they ask the module through the methods of
:class:`LayerType`, and the loader finds its class again in :data:`LAYER_TYPES` by the ``kind``
the artifact's manifest stores. A subclass with a ``kind`` registers itself; docs/design.md
("Adding a layer type") says what to write.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from qaf.config import ConfigError

#: kind -> layer class, filled by defining a :class:`LayerType` subclass with a ``kind``.
LAYER_TYPES: dict[str, type["LayerType"]] = {}


class TensorWriter(Protocol):
    """Where :meth:`LayerType.export_record` puts its tensors (``qaf.export.artifact``)."""

    def float(self, name: str, tensor: Tensor) -> None:
        """Store ``tensor`` as is (float32 stays float32)."""

    def codes(self, name: str, q: Tensor, qmin: int, qmax: int) -> None:
        """Store the integer codes ``q`` in ``qmin..qmax`` at their bit width."""

    def grid(self, prefix: str, grid: Any, always_zero_point: bool = False) -> list[int]:
        """Store a grid's scale (``<prefix>_scale``) and non-zero zero point; returns its spec."""


class TensorReader(Protocol):
    """What :meth:`LayerType.from_record` reads its tensors from (``qaf.export.artifact``)."""

    def float(self, name: str) -> Tensor:
        """A tensor stored by :meth:`TensorWriter.float`."""

    def codes(self, name: str) -> Tensor:
        """Integer codes (int64) stored by :meth:`TensorWriter.codes`."""

    def grid(self, prefix: str, spec: list[int]) -> Any:
        """The ``qaf.quant.uniform.Grid`` stored by :meth:`TensorWriter.grid`."""


class LayerType(nn.Module):
    """Base of every module a method puts into a model; a subclass with a ``kind`` is registered.

    Attributes
    ----------
    kind : str
        Registry key, stored in the artifact's manifest (unique: ``quant_layer``, ``cp_conv2d``, ...).
    factorized : bool
        The layer factorizes a weight: %BOPs in the QAF paper's convention counts the model per
        layer (``qaf.metrics.bops.paper_bops_pct``).
    """

    kind: ClassVar[str] = ""
    factorized: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not kind:
            return
        known = LAYER_TYPES.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"layer kind {kind!r} is already registered by {known.__module__}.{known.__qualname__}")
        LAYER_TYPES[kind] = cls

    def macs(self, output: Tensor) -> int | None:
        """MACs per sample when the layer computes its own way (e.g. a dense conv on a generated
        weight); None (default): its sub-modules are counted (convs, linears, batch norms)."""
        return None

    def storage(self) -> list[tuple[str, int, int]] | None:
        """The tensors the layer stores, ``(name, entries, bits per entry)``, its sub-modules' included
        (other layer types inside it count themselves); None (default): the sub-modules' tensors
        count at their dtypes. A layer with a storage also stores its own tensors in the artifact."""
        return None

    def export_record(self, name: str, writer: TensorWriter) -> dict[str, Any]:
        """JSON fields (and tensors written to ``writer``, under ``<name>.``) from which
        :meth:`from_record` rebuilds the layer. Default: none."""
        return {}

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any], current: nn.Module, reader: TensorReader) -> nn.Module:
        """Rebuild the layer stored at ``name``.

        Parameters
        ----------
        name : str
            The module path.
        record : dict
            What :meth:`export_record` returned.
        current : nn.Module
            The module at ``name`` in the architecture being filled (the float layer replaced, or
            what a parent's ``from_record`` built there). Sub-modules that are layer types are
            rebuilt after this one, from their own records.
        reader : TensorReader
            The stored tensors.

        Returns
        -------
        nn.Module
            The layer; tensors not read here (a layer without ``storage``) are loaded afterwards
            from the float leftovers, by their ``state_dict`` names.
        """
        raise NotImplementedError

    def onnx_module(self) -> nn.Module:
        """The layer in ops ``torch.onnx.export`` lowers (fake quantization as the quantize /
        dequantize ops of :mod:`qaf.quant.qdq`). Default: the layer itself, through its
        sub-modules (each lowered in turn): enough for a layer whose forward only calls them."""
        return self

    def deploy_module(self) -> nn.Module:
        """The layer as the deployable form (:mod:`qaf.export.deploy`) takes it: activation
        quantizers, quantized convs / linears (``QuantLayer``) and torch modules, in a forward that
        ``torch.fx`` traces, computing what the layer computes. Default: the layer itself, through
        its sub-modules (each converted in turn)."""
        return self


def converted(model: nn.Module, method: str) -> nn.Module:
    """``model`` with every layer type replaced by what its ``method`` (``"onnx_module"``,
    ``"deploy_module"``) returns, recursively; a shared module stays shared. The containers of
    ``model`` are modified in place.

    A layer type may return a module that holds the layer itself (a wrapper): the layer is then
    not converted again.
    """
    done: dict[int, tuple[nn.Module, nn.Module]] = {}  # id -> (module, converted): keeps the ids alive

    def convert(module: nn.Module) -> nn.Module:
        if id(module) not in done:
            new = getattr(module, method)() if isinstance(module, LayerType) else module
            done[id(module)] = (module, new)
            for name, child in list(new.named_children()):
                if child is not module:
                    setattr(new, name, convert(child))
        return done[id(module)][1]

    return convert(model)


def exportable(cls: type) -> bool:
    """Whether the artifact can store and rebuild modules of ``cls``."""
    return issubclass(cls, LayerType) and bool(cls.kind) and cls.from_record.__func__ is not LayerType.from_record.__func__


def layer_type(kind: str, module: str | None = None) -> type[LayerType]:
    """The registered class of ``kind``, importing ``module`` (where it is defined) when needed.

    Raises
    ------
    ConfigError
        No such kind, even after importing ``module``.
    """
    if kind not in LAYER_TYPES and module:
        importlib.import_module(module)
    if kind not in LAYER_TYPES:
        raise ConfigError(f"layer kind {kind!r} is not registered (module {module!r}): accepted "
                          f"{', '.join(sorted(LAYER_TYPES))} or a LayerType subclass of that kind")
    return LAYER_TYPES[kind]
