"""The paper's ResNet-18 table, solving part: every factorization of ``experiment=paper_resnet18_imagenet``.

``python -m qaf.bench --paper-grid`` runs the experiment's jobs (its sweeper params: methods x bits
x rates) in the basic sweeper's order, each composed as ``python run.py experiment=... method=M
bits=B rate=R model.pretrained=false`` would compose it and compressed by the real method class,
sharing one fresh temporary :class:`qaf.cache.FactorCache`: the ALS and EPC starts are computed by
the first job of each rate and served from the cache to the other bit widths and methods, as in a
sweep. No image is evaluated. It reports seconds per stage (ALS, EPC, ADMM, from the layer reports)
and per rate, the mean per-layer ``e_quant`` of every job, the total and the peak memory. It also
reports process CPU seconds: on a shared machine wall time depends on the load, and with
``--threads 1`` CPU seconds are close to the wall time on one idle core.

The weights are torchvision's random init (no ImageNet weights offline): a random tensor has a flat
spectrum, so it is the hard case for CP (large errors, every solver runs to its budget); trained
weights converge sooner.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time

import torch
from omegaconf import OmegaConf

from qaf.bench import peak_mem_gb

EXPERIMENT = "paper_resnet18_imagenet"
STAGES = ("als", "epc", "admm")


def grid_jobs(rates: list[str] | None = None) -> list[dict[str, str]]:
    """The experiment's jobs as override dicts, in the order of Hydra's basic sweeper.

    The sweeper takes the cartesian product of its params in the order they are listed (the last
    one varies fastest), so the first job of each rate computes that rate's starts.

    Parameters
    ----------
    rates : list of str, optional
        Keep the jobs of these rates only (spelled as in the experiment); jobs of different rates
        share nothing, so a subset costs what it costs inside the whole grid.
    """
    from qaf.config import ConfigError
    from qaf.export.rerun import CONF

    params = OmegaConf.load(CONF / "experiment" / f"{EXPERIMENT}.yaml").hydra.sweeper.params
    keys = list(params)
    values = [str(params[k]).split(",") for k in keys]
    jobs = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    if rates is None:
        return jobs
    known = str(params["rate"]).split(",")
    unknown = [r for r in rates if r not in known]
    if unknown:
        raise ConfigError(f"--rates {','.join(unknown)} is invalid: accepted rates of the grid, {','.join(known)}")
    return [job for job in jobs if job["rate"] in rates]


def run_job(job: dict[str, str], cache_dir: str, device: torch.device) -> list[dict]:
    """Compress a fresh random-init ResNet-18 as the job would; the layer reports."""
    from qaf.cache import FactorCache
    from qaf.export.rerun import compose
    from qaf.methods.base import CompressContext
    from qaf.pipeline import build
    from qaf.quant.policy import LayerPolicy

    logging.getLogger("qaf").setLevel(logging.INFO)  # the methods' per-layer progress lines
    cfg = compose(f"experiment={EXPERIMENT}", *(f"{k}={v}" for k, v in job.items()), "model.pretrained=false")
    torch.manual_seed(int(cfg.seed))  # the pipeline seeds before building: every job gets the same weights
    model = build(cfg.model)
    method = build(cfg.method, bits=cfg.bits, act_bits=cfg.act_bits, rate=float(cfg.rate))
    ctx = CompressContext(data=None, device=device, policy=LayerPolicy.from_config(cfg.policy),
                          cache=FactorCache(cache_dir), seed=int(cfg.seed), progress=True)
    method.check(model, ctx)
    return method.compress(model, ctx)


def paper_grid(device: torch.device, rates: list[str] | None = None) -> dict:
    """Solve every job of the grid (of ``rates`` only, when given); print and return the figures
    (``paper_grid`` of bench.json)."""
    jobs = grid_jobs(rates)
    print(f"paper grid: {len(jobs)} jobs of experiment={EXPERIMENT} on {device}, {torch.get_num_threads()} "
          "threads; random-init ResNet-18 weights: the hard case for CP (flat spectra, large errors, the "
          "solvers use their whole budgets), trained weights converge sooner", flush=True)
    rows = []
    start, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="qaf-paper-grid-") as cache_dir:
        for idx, job in enumerate(jobs):
            job_start, job_cpu = time.perf_counter(), time.process_time()
            row = job_row(job, run_job(job, cache_dir, device), time.perf_counter() - job_start,
                          time.process_time() - job_cpu)
            rows.append(row)
            print(f"[{idx + 1}/{len(jobs)}] {_label(row)}: {row['seconds']:7.1f} s (" +
                  ", ".join(f"{s.upper()} {row[f'{s}_s']:.1f}" for s in (*STAGES, "other")) +
                  f"; CPU {row['cpu_s']:.1f} s), mean e_quant {row['mean_e_quant']:.6f}", flush=True)
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
    per_rate = {rate: round(sum(r["seconds"] for r in rows if r["rate"] == rate), 2)
                for rate in dict.fromkeys(r["rate"] for r in rows)}
    per_stage = {s: round(sum(r[f"{s}_s"] for r in rows), 2) for s in (*STAGES, "other")}
    result = {"experiment": EXPERIMENT, "device": str(device), "threads": torch.get_num_threads(),
              "jobs": rows, "per_rate_s": per_rate, "per_stage_s": per_stage,
              "total_s": round(total, 1), "total_cpu_s": round(total_cpu, 1), "peak_mem_gb": round(peak_mem_gb(device), 3)}
    print(markdown(result))
    return result


def job_row(job: dict[str, str], layers: list[dict], seconds: float, cpu_seconds: float) -> dict:
    """One job's figures: seconds in all and per stage (``other``: grids, quantizing the other layers,
    error evaluation, building), process CPU seconds, the mean per-layer ``e_quant``, the layer figures."""
    stages = {f"{s}_s": round(sum(layer[f"seconds_{s}"] for layer in layers), 2) for s in STAGES}
    keep = ("name", "rank", "e_float", "e_quant", "iterations", *(f"seconds_{s}" for s in STAGES))
    return {**job, "seconds": round(seconds, 2), "cpu_s": round(cpu_seconds, 2), "mean_e_quant": sum(layer["e_quant"] for layer in layers) / len(layers),
            **stages, "other_s": round(seconds - sum(stages.values()), 2),
            "layers": [{k: layer[k] for k in keep} for layer in layers]}


def _label(row: dict) -> str:
    return f"method={row['method']} bits={row['bits']} rate={row['rate']}"


def markdown(result: dict) -> str:
    """The grid's figures as Markdown tables: jobs, seconds per rate and per stage, total, memory."""
    lines = ["| method | bits | rate | mean e_quant | s | ALS s | EPC s | ADMM s | other s | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['bits']} | {r['rate']} | {r['mean_e_quant']:.6f} | {r['seconds']:.1f} | "
              f"{r['als_s']:.1f} | {r['epc_s']:.1f} | {r['admm_s']:.1f} | {r['other_s']:.1f} | {r['cpu_s']:.1f} |"
              for r in result["jobs"]]
    lines += ["", "| rate | " + " | ".join(result["per_rate_s"]) + " |",
              "|---|" + "---:|" * len(result["per_rate_s"]),
              "| s | " + " | ".join(f"{v:.1f}" for v in result["per_rate_s"].values()) + " |", "",
              "| stage | " + " | ".join(s.upper() for s in STAGES) + " | other | total | total CPU | peak memory |",
              "|---|" + "---:|" * (len(STAGES) + 4),
              "| s | " + " | ".join(f"{v:.1f}" for v in result["per_stage_s"].values()) +
              f" | {result['total_s']:.1f} | {result['total_cpu_s']:.1f} | {result['peak_mem_gb']:.2f} GB |"]
    return "\n".join(lines)
