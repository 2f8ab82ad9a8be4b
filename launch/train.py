"""dqt training entry point.

    python launch/train.py [overrides]                          # one process
    torchrun --nproc_per_node=2 launch/train.py [overrides]     # two ranks (gloo on CPU)
    torchrun --nproc_per_node=2 launch/train.py +scheme=powersgd
    sbatch launch/slurm/train.sbatch [overrides]                # SLURM: N nodes x G ranks
    python launch/train.py -m hydra/launcher=slurm +scheme=onebit,ternary_grad   # a SLURM sweep

``python launch/train.py --help`` lists the config groups and examples.
"""

import importlib.util
import logging
import os
import re
import sys

from dqt.train import preempt  # signal and os only

if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun rank: keep a SIGTERM that comes during
    preempt.install()  # start-up (launch/slurm/train.sbatch has torchrun itself ignore SIGTERM)

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from dqt.config import ConfigError, register_configs, to_typed
from dqt.errors import NoSpace, PeerLost, TrainingDiverged
from dqt.train.run_dir import env_rank, register_resolvers

register_configs()
register_resolvers()
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@record  # inside Hydra, which would swallow the exception: torchrun reports the rank's traceback
def _train(dcfg: DictConfig) -> bool:
    """Train; True if stopped early by a signal (with a checkpoint)."""
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        cfg = to_typed(dcfg)
        from dqt.train.trainer import train  # heavy imports after the config is known good

        return train(cfg, run_dir).preempted
    except ConfigError as e:
        if env_rank() == 0:
            logging.getLogger("dqt").error("config error: %s", e)
            print(f"dqt: config error: {e}", file=sys.stderr)
        _forget_run_dir(run_dir)
        sys.exit(2)
    except NoSpace as e:  # every rank stops at the same save; the last checkpoint is kept
        if env_rank() == 0:
            logging.getLogger("dqt").error("%s", e)
            print(f"dqt: {e}", file=sys.stderr)
        sys.exit(5)
    except PeerLost as e:  # each rank that saw it names itself and the silent ranks
        logging.getLogger("dqt").error("%s", e)
        print(f"dqt: {e}", file=sys.stderr)
        sys.exit(4)
    except TrainingDiverged as e:  # every rank stops at the same step
        if env_rank() == 0:
            logging.getLogger("dqt").error("training diverged: %s", e)
            print(f"dqt: training diverged: {e}", file=sys.stderr)
        sys.exit(3)


def _forget_run_dir(run_dir: str) -> None:
    """After a config error in a run directory this attempt made (only Hydra's record and the
    ranks' log files in it), remove what it wrote: a refused config leaves nothing behind. A
    directory with anything else (an earlier attempt, checkpoints) keeps this attempt's record."""
    hydra_dir = os.path.join(run_dir, ".hydra")
    try:
        names = set(os.listdir(run_dir))
        record = set(os.listdir(hydra_dir)) if os.path.isdir(hydra_dir) else set()
    except OSError:
        return
    if any(not (n == ".hydra" or re.fullmatch(r"train_rank\d+\.log", n)) for n in names) or \
            not record <= {"config.yaml", "hydra.yaml", "overrides.yaml"}:
        return
    own = [os.path.join(run_dir, f"train_rank{env_rank()}.log")]
    if env_rank() == 0:
        own += [os.path.join(hydra_dir, n) for n in record]
    for path in own:
        try:
            os.remove(path)
        except OSError:
            pass
    for d in (hydra_dir, run_dir):  # whichever rank is last removes the directories
        try:
            os.rmdir(d)
        except OSError:
            pass


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(dcfg: DictConfig) -> None:
    preempt.install()  # inside a submitit job this is the first chance
    if _train(dcfg):  # preempted: the checkpoint is written, there is no result to report
        preempt.handoff()  # submitit's handler requeues the job here
        sys.exit(0)  # (outside @record, which would turn exit 0 into a normal return)


def _need_submitit_plugin(argv: list[str]) -> None:
    """hydra/launcher=slurm|slurm_gpu|local extend configs of Hydra's submitit plugin: say what
    to install instead of Hydra's "Could not load 'hydra/launcher/submitit_slurm'"."""
    chosen = [a for a in argv if re.fullmatch(r"hydra/launcher=(slurm\w*|local|submitit_\w+)", a)]
    try:
        found = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        found = False
    if chosen and not found:
        print(f"dqt: {chosen[0]} (conf/hydra/launcher/) needs Hydra's submitit launcher, the "
              "`slurm` extra: pip install -e '.[slurm]'", file=sys.stderr)
        sys.exit(2)


def _config_dirs(argv: list[str]) -> list[str]:
    """The config directories Hydra will read: conf/ and every ``--config-dir``/``-cd``."""
    dirs = [CONF]
    for i, a in enumerate(argv):
        if a in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
    return dirs


def _check_yaml(argv: list[str]) -> None:
    """A YAML syntax error in a config file: one line naming the file, line and column (rank 0),
    instead of Hydra's traceback on every rank."""
    import yaml

    for root in _config_dirs(argv):
        for dirpath, _, files in os.walk(root):
            for name in sorted(f for f in files if f.endswith((".yaml", ".yml"))):
                path = os.path.join(dirpath, name)
                try:
                    with open(path) as f:
                        yaml.safe_load(f)
                except yaml.MarkedYAMLError as e:
                    mark, ctx = e.problem_mark or e.context_mark, e.context_mark
                    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
                    started = (f" ({e.context} at line {ctx.line + 1}, column {ctx.column + 1})"
                               if ctx is not None and e.context else "")
                    if env_rank() == 0:
                        print(f"dqt: config error: {where}: {e.problem or e.context}{started}",
                              file=sys.stderr)
                    sys.exit(2)
                except (yaml.YAMLError, OSError) as e:
                    if env_rank() == 0:
                        print(f"dqt: config error: {path}: {e}", file=sys.stderr)
                    sys.exit(2)


if __name__ == "__main__":
    _need_submitit_plugin(sys.argv[1:])
    _check_yaml(sys.argv[1:])
    main()
