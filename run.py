"""Entry point: `python run.py [group=option ...] [-m]`. See README.md and conf/config.yaml."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from paser import pipeline
from paser.errors import PaserError

log = logging.getLogger("paser")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        hydra_cfg = HydraConfig.get()
        job = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else None  # one GPU per sweep job
        pipeline.run(cfg, run_dir=hydra_cfg.runtime.output_dir, job_index=job)
    except PaserError as e:  # a user-facing problem: the message says what to change
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(2)
    except Exception:  # in a sweep Hydra stores a job's exception silently: put it in the job's log
        log.exception("run failed")
        raise


if __name__ == "__main__":
    main()
