"""Entry point: `python run.py [group=option ...] [-m]`. See README.md and conf/config.yaml."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from paser import pipeline
from paser.errors import PaserError

log = logging.getLogger("paser")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        pipeline.run(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    except PaserError as e:  # a user-facing problem: the message says what to change
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    except Exception:  # in a sweep Hydra stores a job's exception silently: put it in the job's log
        log.exception("run failed")
        raise


if __name__ == "__main__":
    main()
