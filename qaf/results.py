"""metrics.json: the record of one finished run, typed and versioned.

The pipeline builds one :class:`Metrics` per run and writes :meth:`Metrics.to_json`; resume, the
report and export read it back with :func:`from_json`, which checks every field's type. A file
written before ``schema_version`` existed (version 1) still loads: the fields it lacks take their
defaults and its method's :class:`MethodInfo` is inferred from what the file records
(:func:`inferred_info`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

#: Version of the layout below; 1 is every file written before the field existed.
SCHEMA_VERSION = 2


@dataclass(frozen=True)
class MethodInfo:
    """How reports treat a method's rows: declared by the method (``Method.info``), recorded in
    metrics.json (``method_info``).

    Attributes
    ----------
    display : str
        The method's name in tables and plots (``ADMM-EPC``).
    uses_rate : bool
        Its result depends on ``rate`` (it factorizes): its rows show the rate and are compared
        only with rows of the same rate. Other methods keep every weight; their rows show none.
    reference : bool
        It is the uncompressed model every other row is measured against: its row is the float
        row (32/32 bits, drawn as a line, never a series of its own).
    order : int
        Where its rows sit in tables, lower first (then by name).
    variant : str
        What, besides ``method.*`` options, makes the run another variant of the method (its own
        rows and plot series), e.g. ``ranks=budget``; empty for none.
    rate : float or None
        The rate its rows show when its layers' ranks do not all follow ``rate`` (per-layer ranks
        under a budget: the parameter reduction of all factorized layers together); None: ``rate``.
    """

    display: str
    uses_rate: bool = False
    reference: bool = False
    order: int = 100
    variant: str = ""
    rate: float | None = None

    @property
    def unused_settings(self) -> tuple[str, ...]:
        """The run settings its result does not depend on: ``rate`` unless it uses it; ``bits``
        and ``act_bits`` too for the reference (left out of experiment-logger summaries)."""
        return (() if self.uses_rate else ("rate",)) + (("bits", "act_bits") if self.reference else ())


def inferred_info(payload: dict[str, Any]) -> MethodInfo:
    """The :class:`MethodInfo` of a version-1 file, which does not record it.

    The name is shown as it is; the rate applies when the per-layer report gives ranks (the CP
    factorizations, the only methods driven by the rate then); the run is the reference when it
    compressed no layer and kept the float model's size.

    Parameters
    ----------
    payload : dict
        The file's fields.

    Returns
    -------
    MethodInfo
    """
    layers = payload.get("layers") if isinstance(payload.get("layers"), list) else []
    size = payload.get("size_bytes")
    unchanged = not layers and isinstance(size, int) and size == payload.get("fp32_size_bytes")
    return MethodInfo(display=str(payload.get("method")), reference=unchanged,
                      uses_rate=any(isinstance(layer, dict) and "rank" in layer for layer in layers))


@dataclass(kw_only=True)
class Metrics:
    """One run's results, the fields of ``metrics.json`` in their order (docs/design.md#metricsjson
    says what each holds). Fields without a default are required in every version; ``export`` is
    written only when something was exported.
    """

    schema_version: int = SCHEMA_VERSION
    method: str
    method_info: MethodInfo
    model: str
    data: str
    bits: int
    act_bits: int
    rate: float | None = None
    seed: int
    policy: str | None = None
    top1: float
    top5: float
    eval_samples: int
    top1_ci95: list
    fp32_top1: float | None = None
    vs_fp32: dict | None = None
    macs: int | None = None
    fp32_macs: int | None = None
    bops: int | None = None
    bops_pct: float
    bops_pct_paper: float | None = None
    params: int | None = None
    size_bytes: int | None = None
    fp32_size_bytes: int | None = None
    protocol: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    method_summary: dict = field(default_factory=dict)
    finetune_summary: dict | None = None
    timings: dict = field(default_factory=dict)
    sweep_id: str | None = None
    overrides: list = field(default_factory=list)
    config_hash: str
    config: dict
    code: dict = field(default_factory=dict)
    packages: dict = field(default_factory=dict)
    compression_ratio: float | None = None
    export: dict | None = None
    deploy_top1: float | None = None
    deploy_top1_ci95: list | None = None
    deploy_vs_top1: dict | None = None
    deploy: dict | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields as metrics.json holds them (``export`` only when something was exported)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["method_info"] = dataclasses.asdict(self.method_info)
        if self.export is None:
            del out["export"]
        return out


def from_json(payload: Any) -> tuple[Metrics | None, str | None]:
    """``(metrics, None)`` for a valid metrics.json payload of any version, else ``(None, why)``.

    Parameters
    ----------
    payload : Any
        The parsed file.

    Returns
    -------
    tuple
        The typed record, or None and the first problem found (a missing required field, a field
        of the wrong type).
    """
    if not isinstance(payload, dict):
        return None, f"holds a {type(payload).__name__}, not an object"
    if "method_info" not in payload:  # version 1
        payload = {**payload, "schema_version": 1, "method_info": dataclasses.asdict(inferred_info(payload))}
    return _build(Metrics, payload)


def _build(cls: type, payload: dict[str, Any]) -> tuple[Any, str | None]:
    """``cls`` (a dataclass) from ``payload`` with every field's type checked; unknown keys are ignored."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in payload:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                return None, f"field {f.name!r} is missing"
            continue
        value, args = payload[f.name], typing.get_args(hints[f.name])
        kind = next((a for a in args if a is not type(None)), hints[f.name])
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value, problem = _build(kind, value)
            if problem:
                return None, f"field {f.name!r}: {problem}"
        elif not (value is None and type(None) in args) and (
                not isinstance(value, (int, float) if kind is float else kind)
                or (isinstance(value, bool) and kind is not bool)):
            return None, f"field {f.name!r} is not {'a number' if kind is float else f'of type {kind.__name__}'}"
        values[f.name] = value
    return cls(**values), None
