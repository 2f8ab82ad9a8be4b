"""dqt training entry point.

    python launch/train.py [overrides]                          # one process
    torchrun --nproc_per_node=2 launch/train.py [overrides]     # two ranks (gloo on CPU)
    torchrun --nproc_per_node=2 launch/train.py +scheme=powersgd

``python launch/train.py --help`` lists the config groups and examples.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from dqt.config import ConfigError, register_configs, to_typed  # noqa: E402
from dqt.train.run_dir import env_rank, register_resolvers  # noqa: E402

register_configs()
register_resolvers()
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(dcfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        cfg = to_typed(dcfg)
        from dqt.train.trainer import train  # heavy imports after the config is known good

        train(cfg, run_dir)
    except ConfigError as e:
        if env_rank() == 0:
            logging.getLogger("dqt").error("config error: %s", e)
            print(f"dqt: config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    record(main)()
