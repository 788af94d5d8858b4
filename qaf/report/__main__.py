"""``python -m qaf.report DIR [DIR ...]``: write each sweep's table, plot, matched-cost view and page.

Without ``--out`` every sweep directory gets its own report; with ``--out`` the sweeps are
combined into one report there. ``--latest`` picks the newest sweep(s) under
``multirun_outputs/``. Jobs without results are printed with their status; the exit status is 1
when no job finished at all.

``python -m qaf.report --compare RUN_A RUN_B`` compares two job folders on the same images
(paired difference, exact McNemar test); exit status 2 when they cannot be compared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qaf.report import Report, build_report
from qaf.report.collect import OK, latest_sweeps
from qaf.report.compare import NotComparable, compare_runs, format_comparison
from qaf.report.tables import BOPS_FIELDS, problem_jobs, problem_line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line.

    Parameters
    ----------
    argv : list[str] | None
        Arguments (``sys.argv[1:]`` when None).

    Returns
    -------
    argparse.Namespace
        The options.
    """
    parser = argparse.ArgumentParser(prog="python -m qaf.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", type=Path, help="sweep or single-run directories")
    parser.add_argument("--latest", nargs="?", type=int, const=1, default=0, metavar="N",
                        help="also report the N newest sweeps under --root (default N=1)")
    parser.add_argument("--root", type=Path, default=Path("multirun_outputs"),
                        help="where --latest looks (default: multirun_outputs)")
    parser.add_argument("--out", type=Path, help="combine all sweeps into one report here")
    parser.add_argument("--paper", type=Path,
                        help="paper numbers CSV (default: <experiment>.paper.csv if the sweep "
                             "used an experiment config)")
    parser.add_argument("--bops", choices=sorted(BOPS_FIELDS),
                        help="%%BOPs convention of table and plot: qaf (per-layer count) or paper (the QAF "
                             "paper's); default: paper when paper numbers are shown, else qaf")
    parser.add_argument("--title", help="table and plot title")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"),
                        help="compare two job folders on the same images and exit")
    parser.add_argument("--wandb", action="store_true",
                        help="also log one W&B run per sweep group (table + scatter chart)")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"],
                        help="W&B mode (default offline; upload later with `wandb sync`)")
    parser.add_argument("--wandb-project", default="qaf", help="W&B project (default qaf)")
    return parser.parse_args(argv)


def _sweeps(args: argparse.Namespace) -> list[Path]:
    sweeps = list(args.dirs)
    if args.latest:
        if not args.root.is_dir():
            raise SystemExit(f"--root {args.root} is not a directory")
        found = latest_sweeps(args.root, args.latest)
        if not found:
            raise SystemExit(f"--latest: no sweep with jobs under {args.root}")
        sweeps += found
    missing = [str(d) for d in sweeps if not d.is_dir()]
    if missing:
        raise SystemExit(f"not a directory: {', '.join(missing)}")
    if not sweeps:
        raise SystemExit("give sweep directories or --latest")
    return sweeps


def print_report(report: Report, warnings: bool = True) -> None:
    """Print the table, the matched-cost view (two or more methods), the files written and, with
    ``warnings``, every job without results again on stderr."""
    print(report.markdown)
    if report.methods >= 2:
        print(report.frontier)
    for job in problem_jobs(report.jobs) if warnings else []:
        print(f"WARNING {problem_line(job)}", file=sys.stderr)
    if report.paper_csv:
        print(f"paper numbers: {report.paper_csv}")
    print(f"wrote {', '.join(str(p) for p in report.files.values())}")


def run_compare(a: Path, b: Path) -> int:
    """``--compare``: print the comparison, or one error line; 0, or 2 when not comparable."""
    try:
        result = compare_runs(a, b)
    except NotComparable as err:
        print(f"qaf.report --compare: {err}", file=sys.stderr)
        return 2
    print(format_comparison(a, b, result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : list[str] | None
        Arguments (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        0 when some job finished, 1 when none did; with ``--compare`` 0, or 2 when the runs
        cannot be compared.
    """
    args = parse_args(argv)
    if args.compare:
        return run_compare(*args.compare)
    sweeps = _sweeps(args)
    if args.out:
        reports = [build_report(sweeps, args.out, args.paper, args.title, args.bops)]
    else:
        reports = [build_report([s], s, args.paper, args.title, args.bops) for s in sweeps]
    for report in reports:
        print_report(report)
    if args.wandb:
        from qaf.report.wandb_chart import log_to_wandb

        for report in reports:
            for run_dir in log_to_wandb(report.jobs, args.wandb_project, args.wandb_mode,
                                        report.out_dir):
                print(f"W&B run: {run_dir}" + (f"  (upload: wandb sync {run_dir})"
                                               if args.wandb_mode == "offline" else ""))
    return 0 if any(j.status == OK for r in reports for j in r.jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
