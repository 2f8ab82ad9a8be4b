"""The shipped QAT presets (``conf/qat/NAME.yaml``, ``qat=NAME`` on the command line) as typed
configs from Python: ``quantize_(model, preset("dorefa_w2a2"))``.

The presets are read from the ``conf/qat`` directory of the source tree the package is
installed from (``pip install -e .``, the project's install), the directory Hydra reads.
"""

from __future__ import annotations

from pathlib import Path

from dqt.quant.config import QATConfig

QAT_PRESETS = Path(__file__).resolve().parents[2] / "conf" / "qat"


def presets() -> list[str]:
    """The names of the shipped QAT presets."""
    return sorted(p.stem for p in QAT_PRESETS.glob("*.yaml"))


def preset(name: str) -> QATConfig:
    """The typed config of the shipped QAT preset ``name``: the values ``qat=NAME`` gives the
    trainer (its ``defaults`` list only names the schema, :class:`QATConfig`)."""
    from omegaconf import OmegaConf  # a dependency of the configs (MISSING), not heavy

    if not QAT_PRESETS.is_dir():
        raise FileNotFoundError(f"dqt.quant.preset: the presets directory {QAT_PRESETS} is "
                                "missing (install dqt from its source tree: pip install -e .)")
    path = QAT_PRESETS / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        raise ValueError(f"unknown qat preset {name!r}; the presets are: {', '.join(presets())}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QATConfig), raw))
