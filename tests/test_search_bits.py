"""Ristretto's bit-width search (launch/search_bits.py): the selection rule on hand-made tables
(including stepping back up), the table and choice on a tiny CNN trained here, the written qat
config composing with Hydra and training from the checkpoint, the bad-input errors, and the
dynamic fixed point pieces it needs (1..16 bits, a calibrated activation range)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import CONF, REPO, clean_env
from dqt.errors import ConfigError
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.config import to_typed
from dqt.quant import QUANTIZERS, apply_qat
from dqt.quant.prepare import layer_quantizers
from dqt.quant.search import calibrate, next_up, select_bits, smallest_within, within

# a tiny BN CNN: trains in a few seconds, has conv and fc layers
MODEL = ["model=cnn", "model.channels=[4,8]", "model.hidden=16", "model.batch_norm=true"]
BITS = [16, 8, 4, 2, 1]


def compose(config: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dqt.config import register_configs
    from dqt.train.run_dir import register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


# --------------------------------------------------------------------------- the rule
def test_margin_is_in_percentage_points():
    assert within(0.99, 0.96, 3.0)  # a drop of exactly 3 points
    assert not within(0.99, 0.9599, 3.0)
    assert within(0.99, 0.995, 0.0)  # better than the baseline
    assert not within(0.99, 0.9899, 0.0)


def test_smallest_within_stops_at_the_first_failure():
    # 2 bits passes again after 4 bits failed: Ristretto's "else break" never takes it
    row = {16: 0.98, 8: 0.98, 4: 0.90, 2: 0.975, 1: 0.10}
    assert smallest_within(row, 0.99, 3.0) == 8
    assert smallest_within(row, 0.99, 10.0) == 2  # drops 1, 1, 9, 1.5, 89 points
    assert smallest_within({16: 0.98, 8: 0.97, 4: 0.90, 2: 0.89}, 0.99, 10.0) == 2
    assert smallest_within({16: 0.90, 8: 0.99}, 0.99, 3.0) is None  # largest fails: fp32
    assert smallest_within({16: None, 8: 0.99, 4: 0.99}, 0.99, 0.0) == 4  # n/a cells skipped
    assert next_up({16: 0.9, 8: 0.9, 4: 0.9}, 4) == 8
    assert next_up({16: 0.9, 8: 0.9}, 16) is None and next_up({16: None, 8: 0.9}, 8) is None


def test_select_bits_individual_widths_within_margin_no_step_needed():
    table = {"conv": {16: 0.99, 8: 0.99, 4: 0.98, 2: 0.5},
             "fc": {16: 0.99, 8: 0.99, 4: 0.99, 2: 0.97, 1: 0.2},
             "act": {16: 0.99, 8: 0.985, 4: 0.95}}
    calls = []

    def evaluate(bits):
        calls.append(bits)
        return 0.975

    sel = select_bits(table, 0.99, 2.0, evaluate)
    assert sel.individual == {"conv": 4, "fc": 2, "act": 8}
    assert sel.chosen == sel.individual and sel.acc == 0.975 and not sel.stepped_up
    assert calls == [{"conv": 4, "fc": 2, "act": 8}]


def test_select_bits_steps_back_up_until_within_margin():
    table = {"conv": {16: 0.99, 8: 0.99, 4: 0.97},
             "fc": {16: 0.99, 8: 0.985, 4: 0.975},
             "act": {16: 0.99, 8: 0.98, 4: 0.965}}
    combined = {(4, 4, 4): 0.93, (4, 4, 8): 0.95, (8, 4, 8): 0.965}
    calls = []

    def evaluate(bits):
        calls.append(bits)
        return combined[(bits["conv"], bits["fc"], bits["act"])]

    sel = select_bits(table, 0.99, 3.0, evaluate)
    assert sel.individual == {"conv": 4, "fc": 4, "act": 4}
    # 4/4/4 fails (6 points) -> act (0.965, the lowest single-group accuracy) to 8 -> 4/4/8
    # fails (4 points) -> conv (0.97 < fc 0.975 < act@8 0.98) to 8 -> 8/4/8 within (2.5 points)
    assert [tuple(b.values()) for b in calls] == [(4, 4, 4), (4, 4, 8), (8, 4, 8)]
    assert sel.chosen == {"conv": 8, "fc": 4, "act": 8} and sel.acc == 0.965
    assert sel.stepped_up and [a for _, a in sel.trials] == [0.93, 0.95, 0.965]


def test_select_bits_steps_past_the_largest_width_to_fp32():
    table = {"conv": {8: 0.99, 4: 0.99}, "act": {8: 0.99}}
    calls = []

    def evaluate(bits):
        calls.append(dict(bits))
        return 0.0  # every quantized combination fails

    sel = select_bits(table, 0.99, 1.0, evaluate)
    assert sel.chosen == {"conv": None, "act": None} and sel.acc == 0.99  # all fp32: baseline
    # 4/8 -> 8/8 -> fp32/8 (ties at 0.99: conv before act) -> fp32/fp32 = baseline, not run
    assert calls == [{"conv": 4, "act": 8}, {"conv": 8, "act": 8}, {"conv": None, "act": 8}]


# --------------------------------------------------------------------------- dynamic fixed point
def test_dynamic_fixed_1_and_16_bits():
    x = torch.tensor([-1.5, -0.3, 0.0, 0.2, 1.9])  # max|x| 1.9: il = 2
    q1 = QUANTIZERS.get("dynamic_fixed")("weight", bits=1)
    # codes {-1, 0}, δ = 2^-fl = 2^(il - bits) = 2; round to nearest, clamp: 1.9 -> 0
    assert torch.equal(q1(x), torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0]))
    q16 = QUANTIZERS.get("dynamic_fixed")("weight", bits=16)
    d = 2.0 ** (2 - 16)
    assert torch.equal(q16(x), torch.floor(x / d + 0.5) * d)
    code = q16.encode(x.reshape(5, 1))
    assert code.format == "flex" and code.mantissa.dtype == torch.int16
    assert torch.equal(code.decode().reshape(-1), q16(x))  # the export is bit-exact


def test_dynamic_fixed_momentum_only_for_activations():
    spec = QuantizerConfig(name="dynamic_fixed", bits=8, momentum=0.1)
    with pytest.raises(ConfigError, match=r"qat.default.weight.momentum: only activations"):
        QATConfig(default=QATSlotsConfig(weight=spec))
    with pytest.raises(ConfigError, match=r"qat.default.act.bits: must be in \[1, 16\]; got 32"):
        QATConfig(default=QATSlotsConfig(act=QuantizerConfig(name="dynamic_fixed", bits=32)))


def test_calibrate_sets_the_range_and_leaves_batch_norm_alone():
    from dqt.train.models import LeNetCNN

    torch.manual_seed(0)
    act = QuantizerConfig(name="dynamic_fixed", bits=4, momentum=0.1)
    cfg = QATConfig(default=QATSlotsConfig(act=act), keep_first_last=False)
    model = apply_qat(cfg, LeNetCNN((1, 8, 8), [4], 8, 10, batch_norm=True)).eval()
    bn = model.features[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    batches = [torch.randn(16, 1, 8, 8) * s for s in (1.0, 3.0, 2.0)]
    assert calibrate(model, batches) == 3
    q = layer_quantizers(model.features[0])["act"]
    assert bool(q.observer.initialized)
    assert float(q.observer.hi) == max(float(b.abs().max()) for b in batches)  # max over batches
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert not model.training and not q.training
    assert all(p.requires_grad for p in model.parameters())
    # in eval the calibrated range is used, not the batch's own: a larger input saturates
    hi = float(q.observer.hi)
    big = torch.full((1, 1, 8, 8), 4 * hi)
    assert float(q(big).max()) < 2 * hi


# --------------------------------------------------------------------------- on a trained CNN
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny BN CNN trained 60 steps on digits (in this process)."""
    from dqt.train.trainer import train

    run = tmp_path_factory.mktemp("trained")
    cfg = to_typed(compose("train", *MODEL, "steps=60", "eval_every=0", "log_every=60",
                           "optim.lr=0.05"))
    train(cfg, str(run))
    return run


@pytest.fixture(scope="module")
def searched(trained, tmp_path_factory):
    from dqt.train.search_bits import BitSearch, search_bits

    out = tmp_path_factory.mktemp("search")
    cfg = to_typed(compose("search_bits", *MODEL, f"checkpoint={trained}",
                           "search.error_margin=3", "search.calib_batches=2",
                           f"search.write={out}/conf/qat/searched.yaml"))
    result = search_bits(cfg, str(out / "run"))
    return result, out, BitSearch(cfg, str(out / "run2"))


def test_table_has_every_group_and_width(searched):
    result, out, _ = searched
    assert set(result.table) == {"conv", "fc", "act"}
    for g, row in result.table.items():
        assert sorted(row) == sorted(BITS), g
        assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in row.values()), (g, row)
    assert result.baseline > 0.5  # a trained model
    for line in ("| conv weights |", "| fc weights |", "| activations |", "16-bit", "1-bit"):
        assert line in result.text
    saved = json.loads((out / "run" / "search.json").read_text())
    assert saved["table"] == {g: {str(b): a for b, a in row.items()}
                              for g, row in result.table.items()}
    assert saved["chosen"] == result.selection.chosen and saved["baseline"] == result.baseline


def test_16_bits_is_fp32_within_one_test_sample_and_1_bit_is_not(searched):
    """16-bit dynamic fixed point rounds each value to 2^-15 of its tensor's range: at most one
    of the test predictions may flip (tolerance 1/n_test). 1-bit (codes {-1, 0}) must destroy
    the model — proof that the quantizers were attached at all."""
    result, _, search = searched
    tol = 1.0 / search.n_test + 1e-9
    for g in ("conv", "fc", "act"):
        assert abs(result.table[g][16] - result.baseline) <= tol, (g, result.table[g])
        assert result.table[g][1] < result.baseline - 0.3, (g, result.table[g])


def test_choice_satisfies_the_rule_on_the_evaluated_numbers(searched):
    result, _, search = searched
    sel, base = result.selection, result.baseline
    for g, b in sel.individual.items():
        row = result.table[g]
        above = [w for w in BITS if b is None or w >= b]
        if b is not None:  # every width from 16 down to the choice is within the margin
            assert all(100 * (base - row[w]) <= 3 + 1e-9 for w in above), (g, row)
        below = [w for w in BITS if b is None or w < b]
        if below:  # ... and the next smaller one is not
            assert 100 * (base - row[max(below) if b is not None else 16]) > 3, (g, row)
    assert 100 * (base - sel.acc) <= 3 + 1e-9
    assert sel.trials[-1] == (sel.chosen, sel.acc)
    for bits, acc in sel.trials[:-1]:  # every earlier combination was outside the margin
        assert 100 * (base - acc) > 3
    # the accuracy reported for the choice is what the chosen config gives (re-evaluated)
    assert search.evaluate(sel.chosen) == sel.acc


def test_written_config_composes_and_training_starts_from_the_checkpoint(searched, trained,
                                                                           tmp_path, caplog):
    from dqt.train.trainer import train

    result, out, _ = searched
    written = out / "conf" / "qat" / "searched.yaml"
    in_run = out / "run" / "qat" / "searched.yaml"
    assert result.name == "searched" and written.read_text() == in_run.read_text()
    assert yaml.safe_load(written.read_text())["name"] == "searched"
    cfg = to_typed(compose("train", *MODEL, f"hydra.searchpath=[file://{out}/conf]",
                           "qat=searched", f"checkpoint.init_from={trained}", "steps=3",
                           "eval_every=0", "log_every=1", "optim.lr=0.001"))
    sel = result.selection.chosen
    assert cfg.qat.name == "searched" and cfg.qat.keep_first_last is False
    rules = {r.type: r for r in cfg.qat.rules}
    assert set(rules) == {"Conv2d", "Linear"}
    for t, g in (("Conv2d", "conv"), ("Linear", "fc")):
        assert (rules[t].weight.bits if rules[t].weight else None) == sel["conv" if t == "Conv2d" else "fc"]
        assert (rules[t].act.bits if rules[t].act else None) == sel["act"]
    with caplog.at_level("INFO", logger="dqt"):
        res = train(cfg, str(tmp_path / "ft"))
    assert res.step == 3
    assert f"initial weights from {trained}/checkpoints/step_0000060" in caplog.text
    assert "qat searched: per-layer plan" in caplog.text
    # started from the trained weights (a fresh init would be near 10 %)
    assert res.metrics["eval/acc"] > result.baseline - 0.15, res.metrics


def test_another_quantizer_widths_it_refuses_are_not_run(trained, tmp_path):
    from dqt.train.search_bits import search_bits

    cfg = to_typed(compose("search_bits", *MODEL, f"checkpoint={trained}",
                           "search.quantizer=int", "search.bits=[16,8]",
                           "search.calib_batches=1", "search.error_margin=100"))
    result = search_bits(cfg, str(tmp_path / "run"))
    for g in ("conv", "fc", "act"):
        assert result.table[g][16] is None and isinstance(result.table[g][8], float)
        assert result.notes[g] == {16: "must be in [2, 8]; got 16"}
    assert result.selection.chosen == {"conv": 8, "fc": 8, "act": 8}  # margin 100: anything
    assert "| conv weights | n/a | " in result.text
    assert "(n/a: int refuses 16 bits for conv weights: must be in [2, 8]; got 16)" in result.text
    rule = yaml.safe_load((tmp_path / "run" / "qat" / f"{result.name}.yaml").read_text())["rules"][0]
    assert rule == {"type": "Conv2d", "weight": {"name": "int", "bits": 8},
                    "act": {"name": "int", "bits": 8, "momentum": 0.1}}


# --------------------------------------------------------------------------- bad input
def _search(*overrides):
    from dqt.train.search_bits import BitSearch

    cfg = to_typed(compose("search_bits", *MODEL, *overrides))
    return BitSearch(cfg, "/nonexistent/never-written")


@pytest.mark.parametrize("overrides,message", [
    ([], "checkpoint: required"),
    (["checkpoint=/no/such/run"], "checkpoint: /no/such/run does not exist"),
    (["checkpoint=CKPT", "search.error_margin=-1"],
     "search.error_margin: must be >= 0 (percentage points of eval/acc); got -1.0"),
    (["checkpoint=CKPT", "search.quantizer=nope"], "search.quantizer: unknown quantizer 'nope'"),
    (["checkpoint=CKPT", "search.quantizer=twn"], "search.quantizer: twn takes no bits"),
    (["checkpoint=CKPT", "search.quantizer=int", "search.bits=[16,1]"],
     "search.bits: int accepts none of [16, 1]"),
    (["checkpoint=CKPT", "model.channels=[4,4]"],
     "checkpoint: {RUN} was trained with another model (model.channels=[4, 8] there, [4, 4] here)"),
    (["checkpoint=CKPT", "data=synthetic", "data.input_shape=[1,8,8]"],
     "data: the checkpoint's run trained on data=digits"),
])
def test_bad_input_one_error_naming_the_key(trained, overrides, message):
    overrides = [o.replace("CKPT", str(trained)) for o in overrides]
    with pytest.raises(ConfigError) as e:
        _search(*overrides)
    assert str(e.value).startswith(message.replace("{RUN}", str(trained))), str(e.value)


def test_weights_of_another_model_without_its_config(trained, tmp_path):
    # a checkpoint directory copied away from its run (no config.yaml): the weights decide
    ckpt = sorted((trained / "checkpoints").glob("step_*"))[-1]
    alone = tmp_path / "copied" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, alone)
    with pytest.raises(ConfigError) as e:
        _search(f"checkpoint={alone}", "model.hidden=12")
    assert str(e.value).startswith(f"checkpoint: {alone} holds the weights of a different model "
                                   "(shape: classifier.0.weight (16, 32) here (12, 32)")


def test_trainer_init_from_checks_the_model(trained, tmp_path):
    from dqt.train.trainer import train

    cfg = to_typed(compose("train", "model=cnn", f"checkpoint.init_from={trained}", "steps=1"))
    with pytest.raises(ConfigError, match=r"^checkpoint.init_from: .* holds the weights of a "
                                          r"different model"):
        train(cfg, str(tmp_path / "x"))


def test_cli_bad_margin_exit_2_one_message_nothing_written(trained, tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "launch" / "search_bits.py"), *MODEL,
                        f"checkpoint={trained}", "search.error_margin=-3",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=clean_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        "dqt: config error: search.error_margin: must be >= 0 (percentage points of eval/acc); "
        "got -3.0"]
    assert not (tmp_path / "run" / "search.json").exists()
    assert not (tmp_path / "run" / "qat").exists()
