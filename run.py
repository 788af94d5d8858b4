"""qaf entry point: ``python run.py [-m] key=value ...`` (see conf/config.yaml)."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qaf.config import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from qaf.pipeline import run

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg)["top1"]
    except ConfigError as err:
        # One clear line, no traceback: bad input is the user's to fix, not a crash.
        logging.getLogger("qaf").error("config error: %s", err)
        print(f"qaf: config error: {err}", file=sys.stderr)
        if not sweep:
            sys.exit(2)
    except Exception:
        # Into run.log; failed.json already says why. A sweep goes on with its other jobs and
        # exits non-zero at its end (qaf.callbacks.SweepSummary).
        logging.getLogger("qaf").exception("run failed")
        if not sweep:
            raise
    return None


if __name__ == "__main__":
    from qaf.cli import run_command

    run_command(main, main.__wrapped__)
