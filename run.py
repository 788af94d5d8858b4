"""qaf entry point: ``python run.py [-m] key=value ...`` (see conf/config.yaml)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from qaf.config import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from qaf.pipeline import run

    try:
        metrics = run(cfg)
    except ConfigError as err:
        # One clear line, no traceback: bad input is the user's to fix, not a crash.
        logging.getLogger("qaf").error("config error: %s", err)
        print(f"qaf: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        # Into run.log too, so a sweep report can say why a job failed.
        logging.getLogger("qaf").exception("run failed")
        raise
    return metrics["top1"]


if __name__ == "__main__":
    main()
