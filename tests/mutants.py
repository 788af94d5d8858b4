"""Deliberate bugs, one at a time: does the default test suite catch each?

``python tests/mutants.py [NAME ...]`` (``make mutants``) applies each mutation below to the working
tree alone, runs the default suite's test files that concern it (``-x``, slow tests deselected as in
``make test``), restores the file and prints which test failed first. A mutation that no test
catches is a hole in the suite; the script exits non-zero when there is one. It edits files in place
and restores them in a ``finally``: do not run it beside another job on the same checkout.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("mcnemar on the concordant cells", "qaf/metrics/stats.py",
           "p = mcnemar_exact(a_only, b_only)", "p = mcnemar_exact(int(np.sum(a & b)), b_only)",
           ("tests/test_stats.py", "tests/test_report.py")),
    Mutant("wilson interval without its z^2/4n^2 term", "qaf/metrics/stats.py",
           "p * (1 - p) / total + z * z / (4 * total * total)", "p * (1 - p) / total",
           ("tests/test_stats.py",)),
    Mutant("BN re-estimated with the eval transform", "qaf/data/__init__.py",
           "return self.calib_loader(self.bn_transform)", 'return self.calib_loader("eval")',
           ("tests/test_data.py", "tests/test_calib.py", "tests/test_pipeline.py")),
    Mutant("BOPs with the weight bit width off by one", "qaf/metrics/bops.py",
           "return self.macs * self.w_bits * self.a_bits", "return self.macs * (self.w_bits + 1) * self.a_bits",
           ("tests/test_bops.py",)),
    Mutant("EPC skipped (ALS start used instead)", "qaf/methods/cp.py",
           'if "epc" not in keys:', 'if True:',
           ("tests/test_cp_methods.py", "tests/test_decomp.py")),
    Mutant("ADMM dual update dropped", "qaf/decomp/admm.py",
           "u = u + gap", "u = u",
           ("tests/test_decomp.py", "tests/test_cp_methods.py")),
    Mutant("QSWD index width one bit too wide", "qaf/decomp/qswd_layer.py",
           "index_bits = 0 if s == k else math.ceil(math.log2(k))\n        entries",
           "index_bits = 0 if s == k else math.ceil(math.log2(k)) + 1\n        entries",
           ("tests/test_size.py", "tests/test_qswd.py")),
    Mutant("ADMM cache key without the bit width", "qaf/methods/cp.py",
           '"grids": QUANT_VERSION, "bits": self.bits,', '"grids": QUANT_VERSION,',
           ("tests/test_cache.py", "tests/test_cp_methods.py")),
    Mutant("export loses a grid's scale", "qaf/export/artifact.py",
           'self.float(f"{prefix}_scale", grid.scale.float())',
           'self.float(f"{prefix}_scale", torch.ones_like(grid.scale.float()))',
           ("tests/test_export.py",)),
    Mutant("calibration batches drawn from the evaluation set", "qaf/data/__init__.py",
           "return self.loader(self.calib(transform))", "return self.loader(Indexed(self.eval))",
           ("tests/test_pipeline.py", "tests/test_calib.py")),
)


def run(mutant: Mutant) -> str | None:
    """Apply ``mutant``, run its tests, restore; the first failing test's id (None: nothing failed)."""
    path = ROOT / mutant.path
    source = path.read_text()
    if source.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name!r}: its target text is not exactly once in {mutant.path}; update it")
    try:
        path.write_text(source.replace(mutant.old, mutant.new))
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header",
                              *mutant.tests], cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(source)
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)
    return failed.group(1) if failed else None


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or m.name in names]
    missed = 0
    for mutant in chosen:
        caught = run(mutant)
        missed += caught is None
        print(f"{mutant.name:48s} {'caught by ' + caught if caught else 'NOT CAUGHT'}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
