"""Forward passes that recompute only what changed quantization parameters can affect.

A search over quantization parameters (LAPQ's Powell search over clips) runs the same inputs through
the same model hundreds of times, changing one parameter at a time. :class:`IncrementalForward`
traces the model once with ``torch.fx`` into its operations in execution order; a parameter
belongs to the first operation that reads it (calls a module holding it), and nothing computed
before that operation can depend on it. The values that cross each such point (computed before it, read at or
after it: in a ResNet block, the block's input and the main path) are kept from the last pass, so
a pass after a change starts at the first operation the change reaches. The same operations run on
the same values, so the outputs are bit for bit those of ``model(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.fx.node import map_aggregate

from qaf.quant.modules import ActQuantizer, QuantLayer

#: Modules kept whole in the traced graph: their forward branches on modes and flags.
LEAVES = (QuantLayer, ActQuantizer)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAVES) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Kept:
    """A value kept from a pass, with the version counters of its tensors when it was kept."""

    value: Any
    versions: Any


def _versions(value: Any) -> Any:
    """The version counters of the tensors in ``value`` (a tensor, or tuples, lists, dicts of them)."""
    return map_aggregate(value, lambda v: v._version if isinstance(v, Tensor) else None)


def _copy(value: Any) -> Any:
    return map_aggregate(value, lambda v: v.clone() if isinstance(v, Tensor) else v)


class IncrementalForward:
    """Outputs of ``model`` on fixed inputs while a few of its parameters change between passes.

    Kept values live where the inputs live (the solver's device). A kept value that a later
    operation modifies in place is caught by its tensors' version counters: it is dropped, and
    from then on copied when kept and when reused.

    Parameters
    ----------
    model : nn.Module
        The model; it must trace with ``torch.fx`` (``QuantLayer``, ``ActQuantizer`` and ``torch.nn``
        layers are leaves). Its modules are used as they are at each pass.
    owners : sequence of sequence of str
        For each parameter, the names of the modules holding it (a module shared under several
        names, such as a quantizer two layers read through, under each). The parameter reaches the
        first operation that calls one of them, a module inside one, or a leaf containing one; a
        parameter that reaches none is taken to affect everything.
    inputs : sequence of Tensor
        The inputs (batches), fixed for the object's life.

    Attributes
    ----------
    start : np.ndarray
        For each parameter, the index in ``nodes`` of the first operation it reaches.
    nodes : list of torch.fx.Node
        The traced operations in execution order.
    copied : set of torch.fx.Node
        Operations whose values were found modified in place, hence copied.

    Raises
    ------
    Exception
        Whatever ``torch.fx`` raises when the model does not trace.
    """

    def __init__(self, model: nn.Module, owners: Sequence[Sequence[str]], inputs: Sequence[Tensor]):
        graph = _Tracer().trace(model)
        self.nodes = list(graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(f"the traced model takes {len(placeholders)} inputs, not 1")
        self._input = placeholders[0]
        self._interpreter = fx.Interpreter(model, garbage_collect_values=False, graph=graph)
        self.inputs = list(inputs)
        position = {n: i for i, n in enumerate(self.nodes)}

        def first_call(names: Sequence[str]) -> int:
            calls = [i for i, n in enumerate(self.nodes) if n.op == "call_module"
                     and any(f"{n.target}.".startswith(f"{m}.") or m.startswith(f"{n.target}.") for m in names)]
            return min(calls, default=0)

        self.start = np.array([first_call(names) for names in owners], dtype=np.int64)
        last_use = {n: max((position[u] for u in n.users), default=-1) for n in self.nodes}
        self._free_after: list[list[fx.Node]] = [[] for _ in self.nodes]
        for node, last in last_use.items():
            if last >= 0:
                self._free_after[last].append(node)
        # Start points: every parameter's first operation, and the output (a pass with nothing
        # changed reads the kept output). What crosses each: computed before, read at or after it;
        # parameters and buffers (get_attr) are fetched afresh, the input is the batch.
        self._starts = sorted({0, *self.start.tolist(), len(self.nodes) - 1})
        self._crossing = {s: [n for n in self.nodes[:s] if last_use[n] >= s] for s in self._starts}
        kept = {n for crossing in self._crossing.values() for n in crossing
                if n.op not in ("placeholder", "get_attr")}
        self._kept: dict[fx.Node, list[_Kept | None]] = {n: [None] * len(self.inputs) for n in kept}
        self.copied: set[fx.Node] = set()
        self._last: np.ndarray | None = None

    def outputs(self, values: np.ndarray) -> list[Tensor]:
        """The model's output on every input, the model carrying parameter values ``values``.

        Parameters
        ----------
        values : np.ndarray
            The current value of every parameter (compared with the previous call's to find which
            changed; the model must already carry them).

        Returns
        -------
        list of Tensor
            ``model(x)`` for each input, in order.
        """
        values = np.array(values, dtype=np.float64)
        if self._last is None or self._last.shape != values.shape:
            first = 0
        else:
            changed = np.flatnonzero(values != self._last)
            first = int(self.start[changed].min()) if changed.size else len(self.nodes) - 1
        self._last = None  # until this pass completes, the kept values may be half updated
        out = [self._run(b, first) for b in range(len(self.inputs))]
        self._last = values
        return out

    def kept_bytes(self) -> int:
        """Bytes held by the kept values (tensors sharing storage counted once)."""
        storages: dict[int, int] = {}

        def count(v: Any) -> None:
            if isinstance(v, Tensor):
                storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()

        for entries in self._kept.values():
            for entry in entries:
                if entry is not None:
                    map_aggregate(entry.value, count)
        return sum(storages.values())

    def _intact(self, node: fx.Node, batch: int) -> bool:
        """``node``'s value for ``batch`` is kept and unmodified since."""
        entry = self._kept[node][batch]
        return entry is not None and _versions(entry.value) == entry.versions

    def _start(self, batch: int, first: int) -> int:
        """The latest start point at or before ``first`` whose crossing values are all kept intact."""
        return next(s for s in reversed(self._starts) if s <= first
                    and all(self._intact(n, batch) for n in self._crossing[s] if n in self._kept))

    @torch.no_grad()
    def _run(self, batch: int, first: int) -> Tensor:
        start = self._start(batch, first)
        interp = self._interpreter
        env: dict[fx.Node, Any] = {self._input: self.inputs[batch]}
        for node in self._crossing[start]:
            if node.op == "get_attr":
                env[node] = interp.fetch_attr(node.target)
            elif node in self._kept:
                value = self._kept[node][batch].value
                env[node] = _copy(value) if node in self.copied else value
        interp.env = env
        output = None
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            value = interp.run_node(node)
            if node.op == "output":
                output = value
                break
            env[node] = value
            if node in self._kept:
                kept = _copy(value) if node in self.copied else value
                self._kept[node][batch] = _Kept(kept, _versions(kept))
            for dead in self._free_after[i]:
                env.pop(dead, None)
        interp.env = {}
        for node, entries in self._kept.items():
            if entries[batch] is not None and not self._intact(node, batch):  # modified in place
                entries[batch] = None
                self.copied.add(node)
        return output
