"""Refresh a sweep's report and save a PNG of its ``index.html`` as headless Chromium shows it.

    python scripts/screenshot_dashboard.py SWEEP_DIR [--out docs/img/dashboard.png]
    python scripts/screenshot_dashboard.py --latest   # the newest sweep under multirun_outputs/

The report files (``results.csv``, ``table.md``, ..., ``index.html``) are rewritten in
SWEEP_DIR first, as ``python -m qaf.report SWEEP_DIR`` does. The screenshot is the whole page
at ``--width`` pixels unless ``--height`` is given. Needs Chromium (``apt-get install
chromium``, or ``QAF_CHROMIUM=/path/to/chrome``); exits 2 with that hint when there is none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qaf.report import build_report  # noqa: E402
from qaf.report.collect import latest_sweeps  # noqa: E402
from qaf.report.browser import BrowserError, BrowserNotFound, screenshot  # noqa: E402


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
    parser = argparse.ArgumentParser(prog="python scripts/screenshot_dashboard.py",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, nargs="?", help="sweep or single-run directory")
    parser.add_argument("--latest", action="store_true",
                        help="use the newest sweep under --root instead")
    parser.add_argument("--root", type=Path, default=Path("multirun_outputs"),
                        help="where --latest looks (default: multirun_outputs)")
    parser.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"),
                        help="PNG to write (default: docs/img/dashboard.png)")
    parser.add_argument("--width", type=int, default=1280, help="viewport width (default 1280)")
    parser.add_argument("--height", type=int,
                        help="viewport height (default: the whole page)")
    parser.add_argument("--title", help="table and plot title (default: the sweep's name)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds before the browser is killed (default 60)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : list[str] | None
        Arguments (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        0 on success, 1 when the sweep has no finished job (the PNG is still written),
        2 when there is no browser or it failed.
    """
    args = parse_args(argv)
    sweep = args.sweep
    if (sweep is None) == (not args.latest):
        raise SystemExit("give a sweep directory or --latest (not both)")
    if args.latest:
        found = latest_sweeps(args.root, 1) if args.root.is_dir() else []
        if not found:
            raise SystemExit(f"--latest: no sweep with jobs under {args.root}")
        sweep = found[0]
    if not sweep.is_dir():
        raise SystemExit(f"not a directory: {sweep}")
    report = build_report([sweep], sweep, title=args.title)
    page = report.files["index.html"]
    try:
        png = screenshot(page, args.out, width=args.width, height=args.height,
                         timeout=args.timeout)
    except (BrowserNotFound, BrowserError) as err:
        print(f"screenshot_dashboard: {err}", file=sys.stderr)
        return 2
    print(f"wrote {page} and {png}")
    return 0 if any(j.status == "ok" for j in report.jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
