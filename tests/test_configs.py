"""Config groups composed with Hydra's compose API (every option, every experiment), the
scheme registry against conf/scheme/, and every bad-input case with its exact message."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF, run_train
from dqt.comm.scheme import SCHEMES, scheme_names
from dqt.errors import ConfigError
from dqt.config import TrainConfig, to_typed
import dqt.comm.torch_hooks  # noqa: F401  (registers the baselines)

GROUPS = ["model", "data", "optim", "qat", "precision", "logger", "backend"]
PAIRED = {"model=gpt": ["data=text"], "data=text": ["model=gpt"],
          "data=shakespeare": ["model=gpt"], "model=transformer": ["data=sort"],
          "data=sort": ["model=transformer"]}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(compose, override):
    cfg = to_typed(compose(override, *PAIRED.get(override, [])))
    assert isinstance(cfg, TrainConfig)
    group, option = override.split("=")
    assert getattr(cfg, group).name  # every option names itself
    if group in ("precision", "backend", "logger"):
        assert getattr(cfg, group).name == option


@pytest.mark.parametrize("scheme", _options("scheme"))
def test_every_scheme_composes_with_plus_and_is_registered(compose, scheme):
    cfg = to_typed(compose(f"+scheme={scheme}"))
    assert cfg.scheme.name == scheme
    assert type(cfg.scheme) in SCHEMES, f"conf/scheme/{scheme}.yaml has no registered builder"


@pytest.mark.parametrize("name", scheme_names())
def test_every_registered_scheme_has_a_config_file(name):
    if name == "allreduce":  # the default when no +scheme is given
        assert not (CONF / "scheme" / "allreduce.yaml").exists()
        return
    assert (CONF / "scheme" / f"{name}.yaml").exists(), f"scheme '{name}' has no conf/scheme file"


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(compose, experiment):
    cfg = to_typed(compose(f"experiment={experiment}"))
    assert cfg.steps > 0


def test_experiment_overrides_primary_config(compose):
    cfg = to_typed(compose("experiment=mlp20m_synthetic"))
    assert cfg.steps == 50 and cfg.model.widths == [3072, 3072, 3072]
    assert cfg.data.name == "synthetic"


def test_no_scheme_means_plain_allreduce(compose):
    cfg = to_typed(compose())
    assert cfg.scheme is None


def test_run_dir_from_env_shared_by_all_ranks(compose, monkeypatch, tmp_path):
    from dqt.train import run_dir

    run_dir.run_dir.cache_clear()
    monkeypatch.setenv("DQT_RUN_DIR", str(tmp_path / "shared"))
    try:
        from hydra import compose as hc, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hc("train", return_hydra_config=True)
        assert OmegaConf.select(cfg, "hydra.run.dir") == str(tmp_path / "shared")
    finally:
        run_dir.run_dir.cache_clear()


BAD_VALUES = [
    (["optim.lr=-1"], "optim.lr: must be > 0; got -1.0"),
    (["steps=0"], "steps: must be > 0; got 0"),
    (["grad_accum=0"], "grad_accum: must be > 0; got 0"),
    (["data.batch_size=0"], "data.batch_size: must be > 0; got 0"),
    (["model.widths=[]"], "model.widths: must be a non-empty list of positive ints; got []"),
    (["optim.schedule=exp"], "optim.schedule: must be one of constant, cosine, linear; got 'exp'"),
    (["logger=wandb", "logger.mode=sometimes"],
     "logger.mode: must be one of online, offline, disabled; got 'sometimes'"),
    (["+scheme=powersgd", "scheme.matrix_approximation_rank=0"],
     "scheme.matrix_approximation_rank: must be >= 1; got 0"),
    (["model=gpt"], "data: model=gpt trains on data=text"),
    (["data=text"], "model: model=gpt trains on data=text"),
    (["data=shakespeare"], "model: model=gpt trains on data=text or data=shakespeare"),
    (["model=gpt", "data=digits"], "data: model=gpt trains on data=text or data=shakespeare"),
    (["model=transformer"], "data: model=transformer trains on data=sort (token-classification"),
    (["data=sort"], "model: model=transformer trains on data=sort"),
    (["model=gpt", "data=sort"], "data: model=gpt trains on data=text or data=shakespeare"),
    (["model=transformer", "data=shakespeare"], "data: model=transformer trains on data=sort"),
    (["model=resnet20", "model.depth=21"], "model.depth: must be 6n+2"),
    (["checkpoint.keep=0"], "checkpoint.keep: must be >= 1; got 0"),
    (["+scheme=qsgd", "scheme.bits=0"], "scheme.bits: must be in [2, 8]; got 0"),
    (["+scheme=qsgd", "scheme.bits=9"], "scheme.bits: must be in [2, 8]; got 9"),
    (["+scheme=ternary_grad", "scheme.format=base4"],
     "scheme.format: must be one of 2bit, base3; got 'base4'"),
    (["+scheme=onebit", "scheme.collective=ring"],
     "scheme.collective: must be one of two_phase, allgather; got 'ring'"),
    (["+scheme=signsgd", "scheme.error_feedback=true"], "use scheme=ef_signsgd"),
    (["+scheme=ternary_grad", "scheme.error_feedback=true"],
     "scheme.error_feedback: ternary_grad rounds stochastically and its error is not a contraction"),
    (["+scheme=qsgd", "scheme.error_feedback=true"],
     "scheme.error_feedback: qsgd rounds stochastically"),
    (["+scheme=onebit", "scheme.block_size=-1"], "scheme.block_size: must be a positive multiple of 8"),
    (["+scheme=onebit", "scheme.block_size=100"], "scheme.block_size: must be a positive multiple of 8"),
    (["+scheme=onebit", "scheme.kernel=cuda"], "scheme.kernel: must be one of auto, c, triton, reference"),
    (["+scheme=onebit", "scheme.auto_trials=0"], "scheme.auto_trials: must be >= 1; got 0"),
    (["+scheme=onebit", "scheme.auto_margin=0"], "scheme.auto_margin: must be > 0; got 0.0"),
    (["+scheme=onebit", "scheme.reconstruction=median"],
     "scheme.reconstruction: must be one of symmetric, two_means; got 'median'"),
    (["+scheme=ef_signsgd", "scheme.reconstruction=two"],
     "scheme.reconstruction: must be one of symmetric, two_means; got 'two'"),
    (["backend.bucket_cap_mb=0"], "backend.bucket_cap_mb: must be > 0 (MiB) or null; got 0"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[b[0][-1] for b in BAD_VALUES])
def test_bad_values_name_the_key(compose, overrides, message):
    with pytest.raises(ConfigError) as e:
        to_typed(compose(*overrides))
    assert message in str(e.value)


@pytest.mark.parametrize("scheme", ["onebit", "ef_signsgd"])
def test_onebit_reconstruction_picks_the_block_kind(compose, scheme):
    """``scheme.reconstruction``: symmetric (the default) is one mean|x| per block, two_means
    Seide et al.'s two (kind sign_two, two scales per block)."""
    cfg = to_typed(compose(f"+scheme={scheme}"))
    assert cfg.scheme.reconstruction == "symmetric"
    assert cfg.scheme.block_spec().kind == "sign_mean"
    cfg = to_typed(compose(f"+scheme={scheme}", "scheme.reconstruction=two_means"))
    spec = cfg.scheme.block_spec()
    assert (spec.kind, spec.scales_per_block) == ("sign_two", 2)
    assert spec.scale == ("e8m0" if scheme == "onebit" else "fp32")


def test_typo_key_is_rejected_by_hydra_naming_the_key(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose("stepz=3")
    assert "Key 'stepz' not in 'TrainConfig'" in str(e.value.__cause__)


@pytest.mark.parametrize("override,schema", [("scheme.scale_dtype=bf16", "QSGDConfig"),
                                             ("scheme.bits=4", "OneBitConfig")])
def test_a_field_of_another_scheme_is_rejected_naming_the_key(compose, override, schema):
    scheme = "qsgd" if schema == "QSGDConfig" else "onebit"
    with pytest.raises(ConfigCompositionException) as e:
        compose(f"+scheme={scheme}", override)
    key = override.split("=")[0].split(".")[1]
    assert f"Key '{key}' not in '{schema}'" in str(e.value.__cause__)


def test_typo_key_inside_a_group_is_rejected(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose("optim.lrr=0.1")
    assert "Key 'lrr' not in 'OptimConfig'" in str(e.value.__cause__)


def test_wrong_type_is_rejected(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose("steps=abc")
    assert "could not be converted to Integer" in str(e.value.__cause__)


def test_model_batch_norm_is_typed(compose):
    assert to_typed(compose("experiment=digits_cnn_bn")).model.batch_norm is True
    assert to_typed(compose("model=mlp", "model.batch_norm=true")).model.batch_norm is True
    assert to_typed(compose("model=cnn")).model.batch_norm is False
    with pytest.raises(ConfigCompositionException) as e:
        compose("model=cnn", "model.batch_norm=maybe")
    assert "full_key: model.batch_norm" in str(e.value.__cause__)
    assert "not a valid bool" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:  # ResNet always has BN: no such key
        compose("model=resnet20", "model.batch_norm=true")
    assert "Key 'batch_norm' not in 'ResNetConfig'" in str(e.value.__cause__)


def test_unknown_option_lists_the_available_ones(compose):
    with pytest.raises(MissingConfigException) as e:
        compose("+scheme=nope")
    assert "Could not find 'scheme/nope'" in str(e.value)
    assert "powersgd" in str(e.value)


def test_scheme_without_plus_explains_the_plus(compose):
    with pytest.raises(ConfigCompositionException) as e:
        compose("scheme=fp16")
    assert "+scheme=fp16" in str(e.value)


# ---------------------------------------------------------------- the real CLI, end to end
def test_cli_bad_value_one_message_exit_2_nothing_written(tmp_path):
    p = run_train("optim.lr=-1", f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 2, p.stderr
    assert "dqt: config error: optim.lr: must be > 0; got -1.0" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "run").exists(), "a refused config leaves no run directory"


def test_cli_bad_value_keeps_an_existing_directorys_files(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    p = run_train("optim.lr=-1", f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 2, p.stderr
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_cli_yaml_syntax_error_names_file_line_and_column_once(tmp_path):
    exp = tmp_path / "conf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "mine.yaml").write_text("# @package _global_\nsteps: 3\noptim:\n  lr: [0.1\n")
    p = run_train("--config-dir", str(tmp_path / "conf"), "+experiment=mine",
                  f"hydra.run.dir={tmp_path}/run", nproc=2)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if "mine.yaml" in ln]
    assert lines == [f"dqt: config error: {exp / 'mine.yaml'}:5:1: expected ',' or ']', but "
                     "got '<stream end>' (while parsing a flow sequence at line 4, column 7)"]
    assert "hydra/_internal" not in p.stderr  # no Hydra traceback (torchrun adds its own report)
    assert not (tmp_path / "run").exists()


def test_cli_typo_key(tmp_path):
    p = run_train("stepz=3", f"hydra.run.dir={tmp_path}/run")
    assert p.returncode != 0
    assert "Key 'stepz' not in 'TrainConfig'" in p.stderr


def test_cli_unknown_scheme_lists_options(tmp_path):
    p = run_train("+scheme=nope", f"hydra.run.dir={tmp_path}/run")
    assert p.returncode != 0
    assert "Could not find 'scheme/nope'" in p.stderr and "powersgd" in p.stderr


def test_cli_missing_data_root_says_where_to_put_files(tmp_path):
    p = run_train("data=cifar10", "model=cnn", f"data.root={tmp_path}/nowhere",
                  f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 2, p.stderr
    assert "dqt: config error: data.root:" in p.stderr and "data_batch_1" in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_help_lists_groups_and_examples():
    p = run_train("--help")
    assert p.returncode == 0
    for text in ("scheme: bf16, ef_signsgd, fp16, fp8, onebit, powersgd, qsgd, signsgd, ternary_grad", "model: cnn, gpt, mlp, mlp_20m, resnet20, transformer",
                 "data: cifar10, digits, mnist, shakespeare, sort, synthetic, text", "torchrun --nproc_per_node"):
        assert text in p.stdout
