"""Export of compressed models: the integer-code artifact, its loader, ONNX with Q/DQ nodes.

- :func:`save` / :func:`load`: ``model.qaf.safetensors`` (integer codes at their bit widths,
  grids, float leftovers, config and module manifest), and the exact module back from it.
- :func:`export_onnx`: an ONNX graph with QuantizeLinear/DequantizeLinear nodes where the
  fake-quant modules are (``qaf.export.onnx``).
- :func:`export_run`: what a run with ``export=...`` writes beside its ``metrics.json``.
- ``python -m qaf.export RUN_DIR``: the same for a finished run (its compression re-run from its
  config, factorizations from the factor cache).

docs/export.md describes the file format and the ONNX layout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from qaf.export.artifact import ARTIFACT_NAME, load, read_metadata, save

log = logging.getLogger("qaf")

ONNX_NAME = "model.onnx"

__all__ = ["ARTIFACT_NAME", "ONNX_NAME", "export_onnx", "export_options", "export_run", "load",
           "read_metadata", "save"]


def export_onnx(*args: Any, **kwargs: Any) -> Any:
    """See :func:`qaf.export.onnx.export_onnx` (imported lazily: it needs the ``onnx`` package)."""
    from qaf.export.onnx import export_onnx as _export

    return _export(*args, **kwargs)


def export_options(cfg: Mapping[str, Any] | Any) -> tuple[bool, bool]:
    """``(artifact, onnx)``: which files a run writes.

    ``export=true`` asks for the artifact; ``export.artifact`` and ``export.onnx`` choose each file.
    """
    node = cfg.get("export", False)
    if node is None or isinstance(node, bool):
        return bool(node), False
    return bool(node.get("artifact", False)), bool(node.get("onnx", False))


def _result_config(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig

    from qaf.config import result_config

    if isinstance(cfg, DictConfig):
        return result_config(cfg)
    return dict(cfg or {})


def export_run(model: nn.Module, cfg: Any, output_dir: str | Path, input_size: tuple[int, int, int],
               metrics: Mapping[str, Any] | None = None, *, artifact: bool | None = None,
               onnx: bool | None = None, verify: bool = True) -> dict[str, Any]:
    """Write what the config's ``export`` key asks for into ``output_dir``; return what was written.

    Parameters
    ----------
    model : nn.Module
        The compressed, calibrated model (as evaluated).
    cfg : DictConfig or dict
        The run config (``export`` read by :func:`export_options`; the resolved result config is
        stored in the artifact).
    output_dir : path
        The job folder (``metrics.json`` goes there).
    input_size : tuple of int
        ``(C, H, W)`` of the run's images (``DataBundle.input_size``).
    metrics : mapping, optional
        The run's metrics (``size_bytes`` and a few figures are recorded).
    artifact, onnx : bool, optional
        Override the config's choice.
    verify : bool
        Before writing the artifact, rebuild the model from it and check that it gives the exported
        model's logits bit for bit on two random images (a second or so); raises ``RuntimeError``
        when it does not.

    Returns
    -------
    dict
        Empty when nothing was asked for; else ``path``, ``bytes``, ``payload_bytes``,
        ``header_bytes``, ``size_bytes`` (the storage model's figure), ``verified`` and, with
        ONNX, ``onnx_path``, ``onnx_bytes``, ``seconds``.
    """
    want_artifact, want_onnx = export_options(cfg)
    want_artifact = want_artifact if artifact is None else artifact
    want_onnx = want_onnx if onnx is None else onnx
    if not (want_artifact or want_onnx):
        return {}
    start = time.perf_counter()
    output_dir = Path(output_dir)
    config = _result_config(cfg)
    metrics = dict(metrics or {})
    size = metrics.get("size_bytes")
    if size is None:
        from qaf.metrics.size import size_bytes

        size = size_bytes(model)
    result: dict[str, Any] = {"size_bytes": size}
    was_training = model.training
    model.eval()
    try:
        if want_artifact:
            result.update(save(model, output_dir / ARTIFACT_NAME, config, metrics, input_size if verify else None))
            log.info("export: %s, %d bytes (%d of tensor data, %d of header); storage model %d bytes",
                     result["path"], result["bytes"], result["payload_bytes"], result["header_bytes"], size)
        if want_onnx:
            onnx_path = output_dir / ONNX_NAME
            export_onnx(model, onnx_path, input_size=input_size)
            result.update({"onnx_path": str(onnx_path), "onnx_bytes": onnx_path.stat().st_size})
            log.info("export: %s, %d bytes", onnx_path, result["onnx_bytes"])
    finally:
        model.train(was_training)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result

