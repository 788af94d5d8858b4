"""The command line around Hydra (``run.py``): its shorthand, and its errors before any job runs.

- ``export=true`` is shorthand for ``export.artifact=true`` (:func:`expand_shorthand`), so it
  composes with ``export.onnx=true`` (Hydra would replace the ``export`` node by a bool, and
  ``export.onnx`` would then not exist).
- An error before the task runs, whatever raises it (Hydra composing the config: an unknown option
  of a group, a key that does not exist, an override it cannot parse; or an output folder that
  cannot be created), prints one line, ``qaf: config error: ...``, and exits 2, like qaf's own
  config errors (:class:`qaf.config.ConfigError`). ``HYDRA_FULL_ERROR=1`` keeps Hydra's tracebacks.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from types import CodeType, TracebackType
from typing import Any

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

#: The exit status of bad input (qaf's config errors and Hydra's own).
CONFIG_ERROR_STATUS = 2
_EXPORT = re.compile(r"export=(true|false)", re.IGNORECASE)


def expand_shorthand(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``export=true`` / ``export=false`` written as ``export.artifact=...``."""
    return [f"export.artifact={arg.split('=', 1)[1].lower()}" if _EXPORT.fullmatch(arg) else arg for arg in argv]


def one_line(err: BaseException) -> str:
    """What a Hydra or output-folder error says, on one line (a missing option lists those accepted)."""
    if isinstance(err, MissingConfigException):
        first = str(err).splitlines()[0].removeprefix("In 'config': ")
        group = (err.missing_cfg_file or "").rpartition("/")[0]
        return f"{first}: accepted {group}={', '.join(err.options)}" if err.options and group else first
    if isinstance(err, OSError):
        return (f"cannot create the output folder ({err.strerror}: {err.filename}): accepted hydra.run.dir "
                "(hydra.sweep.dir for a sweep) set to a folder this user can write")
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause):
        text += f" ({str(cause).splitlines()[0]})"
    return text


def _before(err: BaseException, task: CodeType) -> bool:
    """Whether ``err`` was raised before the task function ran (none of its frames is the task's)."""
    tb: TracebackType | None = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is task:
            return False
        tb = tb.tb_next
    return True


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (itself, or what it was raised from: logging's file handler
    raises a ValueError from it)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def run_command(hydra_main: Callable[[], Any], task: Callable[..., Any]) -> None:
    """Run ``hydra_main`` (a ``@hydra.main`` function) on ``sys.argv``, shorthand expanded.

    Parameters
    ----------
    hydra_main : callable
        The decorated entry point.
    task : callable
        The undecorated task function (``hydra_main.__wrapped__``): errors raised outside its
        frames happened before any job ran.

    Raises
    ------
    SystemExit
        2 with one line on stderr for an error before the task; 1 with the traceback for
        another error Hydra reports; the task's own status otherwise.
    """
    sys.argv[1:] = expand_shorthand(sys.argv[1:])
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing: the error is judged here
    try:
        hydra_main()
    except Exception as err:  # noqa: BLE001 - every error Hydra would report
        cause = err if isinstance(err, (HydraException, OmegaConfBaseException)) else _os_error(err)
        if cause is None or not _before(err, task.__code__):
            traceback.print_exc()  # as Hydra reports it, exit 1
            sys.exit(1)
        print(f"qaf: config error: {one_line(cause)}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_STATUS)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
