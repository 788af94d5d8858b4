"""``python -m qaf.export RUN_DIR [--onnx]``: export a finished run's compressed model.

The run's compression is re-run from its resolved config (``metrics.json["config"]``, execution
keys such as the cache folder and device from ``.hydra/config.yaml``; factorizations come from the
factor cache when the run filled it), then ``model.qaf.safetensors`` (and ``model.onnx`` with
``--onnx``) is written into RUN_DIR. Unless ``--no-check``, the reloaded artifact (and the ONNX
model under onnxruntime) is scored on the run's evaluation set and compared with the run's top-1.
Prints one JSON object; exits 1 when the artifact's top-1 differs from the run's, 2 (one line on
stderr) when the run or its model cannot be exported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qaf.config import ConfigError
from qaf.export import ONNX_NAME, export_run, load
from qaf.export.rerun import compressed_model, config_of_run, top1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m qaf.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a job folder holding metrics.json")
    parser.add_argument("--onnx", action="store_true", help=f"also write {ONNX_NAME} (Q/DQ nodes)")
    parser.add_argument("--cache-dir", default=None, help="factor cache folder (default: the run's)")
    parser.add_argument("--device", default=None, help="solvers' device (default: the run's)")
    parser.add_argument("--no-check", action="store_true", help="skip scoring the exported model(s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.json").is_file():
        parser.error(f"{run_dir} holds no metrics.json")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    try:
        cfg = config_of_run(run_dir, cache_dir=args.cache_dir, device=args.device)
        model, data = compressed_model(cfg)
        result = export_run(model, cfg, run_dir, data.input_size, metrics, artifact=True, onnx=args.onnx)
    except ConfigError as err:
        print(f"qaf.export: {err}", file=sys.stderr)
        sys.exit(2)
    result["run_top1"] = metrics.get("top1")
    if not args.no_check:
        loader = data.eval_loader()
        result["artifact_top1"] = round(top1(load(result["path"]), loader), 4)
        if args.onnx:
            from qaf.export.onnx import onnx_logits, session

            sess = session(result["onnx_path"], level="basic")
            result["onnx_top1"] = round(top1(lambda x: onnx_logits(sess, x), loader), 4)
    print(json.dumps(result, indent=2))
    if "artifact_top1" in result and result["run_top1"] is not None \
            and abs(result["artifact_top1"] - result["run_top1"]) > 1e-9:
        print(f"qaf.export: the exported model scores {result['artifact_top1']} but the run reported "
              f"{result['run_top1']}: the re-run compression differs from the run's", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
