"""Ristretto's bit-width search on a trained run: quantize conv weights, fc weights and
activations one group at a time at 16, 8, 4, 2, 1 bits (dynamic fixed point), print the
accuracy table, choose the smallest widths within the error margin, write the ``qat`` config.

    python launch/search_bits.py experiment=digits_cnn_bn checkpoint=outputs/<run> search.error_margin=3
    python launch/search_bits.py model=cnn data=digits checkpoint=outputs/<run>/checkpoints/step_0000300 \\
        search.write=conf/qat/my_search.yaml search.finetune=true steps=100 optim.lr=0.01
    python launch/search_bits.py ... search.quantizer=int search.bits=[8,6,4,3,2]

The rule and its Ristretto reference: ``dqt/quant/search.py``; the loop: ``dqt/train/search_bits.py``;
the knobs: ``conf/search_bits.yaml`` (``--cfg job`` prints them).
"""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dqt.config import ConfigError, register_configs, to_typed
from dqt.train.run_dir import register_resolvers

register_configs()
register_resolvers()
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="search_bits")
def main(dcfg: DictConfig) -> None:
    hc = HydraConfig.get()
    try:
        cfg = to_typed(dcfg)
        from dqt.train.search_bits import search_bits  # heavy imports after the config is good

        search_bits(cfg, hc.runtime.output_dir, list(hc.overrides.task))
    except ConfigError as e:
        logging.getLogger("dqt").error("config error: %s", e)
        print(f"dqt: config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
