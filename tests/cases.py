"""The case tables that the codec and kernel tests and the benchmarks share (composer's
``algorithm_settings``, Liger-Kernel's shared cases): a codec registered in
:mod:`dqt.comm.config` without a case here fails ``tests/test_compressors.py``, and every test
and benchmark of it draws its settings from this one place.

* :data:`CODECS` — case id → (``scheme.name``, config options): every codec and its variants;
* :data:`BENCH` — the benchmarks' row labels → case id (``benchmarks/bench_kernels.py``,
  ``bench_comm.py``, ``sass_decode.py``);
* :data:`HOOK` — the cases the multi-rank collective tests run (``tests/test_comm_compressed.py``);
* :data:`SPECS` — raw block formats for the kernel tests, beyond what the codecs' presets use
  (other scale formats, clipping, 3/6-bit codes).

The quantizers' cases (:data:`dqt.quant.QUANTIZERS`): a quantizer registered without its cases
here fails the coverage tests of ``tests/test_quant_golden.py`` and ``tests/test_quant_export.py``
(and, without a gradient test, ``tests/test_quant_ste.py``):

* :data:`GOLDEN` — name → golden cases (id, kind, arguments, input, numpy reference from
  ``tests/quant_refs.py`` / ``tests/seed_c_refs.py``) on the inputs :data:`W`, :data:`A`,
  :data:`S`; :data:`GOLDEN_ELSEWHERE` — the quantizers whose golden test needs a layer or the
  backward pass, and where it is;
* :data:`EXPORT_ARGS` — every weight quantizer with the arguments its export tests use;
* :data:`IDENTITY_STE` — the quantizers whose gradient is the plain identity STE: (kind, input,
  arguments), on :data:`STE_X`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dqt.kernels.blockq import BlockSpec
from tests.quant_refs import (hwgq_step, np_absmean, np_admm_projection, np_ap2, np_aqn,
                              np_balanced, np_bwn, np_dorefa_a, np_dorefa_w, np_dynamic_fixed,
                              np_flex, np_horq, np_hwgq, np_inq, np_int, np_int_group,
                              np_int_token, np_kmeans, np_linear, np_log2, np_log_linear, np_lsq,
                              np_minifloat, np_pact, np_pow2, np_qnn_linear, np_shiftcnn, np_sign,
                              np_slq, np_tanh, np_ttq, np_twn, np_uint, np_uint_group, np_uint_token)
from tests.seed_c_refs import np_pq, np_sdd, np_tnn, np_wage_a, np_wage_w  # second-tier survey

CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "onebit": ("onebit", {}),
    "onebit/bf16": ("onebit", {"scale_dtype": "bf16"}),
    "onebit/two_means": ("onebit", {"reconstruction": "two_means"}),
    "ef_signsgd": ("ef_signsgd", {}),
    "signsgd": ("signsgd", {}),
    "ternary_grad": ("ternary_grad", {}),
    "ternary_grad/base3": ("ternary_grad", {"format": "base3"}),
    "qsgd/2": ("qsgd", {"bits": 2}),
    "qsgd/3": ("qsgd", {"bits": 3}),
    "qsgd/4": ("qsgd", {"bits": 4}),
    "qsgd/8": ("qsgd", {"bits": 8}),
    "fp8": ("fp8", {}),
    "fp8/e5m2": ("fp8", {"format": "e5m2"}),
    "fp8/e8m0/ef": ("fp8", {"scale_dtype": "e8m0", "error_feedback": True}),
}
STOCHASTIC = [k for k, (name, _) in CODECS.items() if name in ("ternary_grad", "qsgd")]

BENCH: dict[str, str] = {
    "onebit": "onebit",
    "ef_signsgd": "ef_signsgd",
    "signsgd": "signsgd",
    "ternary_grad (2bit)": "ternary_grad",
    "ternary_grad (base3)": "ternary_grad/base3",
    "qsgd bits=2": "qsgd/2",
    "qsgd bits=4": "qsgd/4",
    "qsgd bits=8": "qsgd/8",
    "fp8 (e4m3)": "fp8",
    "fp8 (e5m2)": "fp8/e5m2",
}

HOOK = ["onebit", "onebit/two_means", "signsgd", "ef_signsgd", "ternary_grad",
        "ternary_grad/base3", "qsgd/4", "qsgd/3", "fp8", "fp8/e5m2", "fp8/e8m0/ef"]

SPECS: dict[str, BlockSpec] = {
    "onebit/bf16": BlockSpec("sign_mean", 64, 1, "bf16"),
    "onebit/e8m0": BlockSpec("sign_mean", 128, 1, "e8m0"),
    "qsgd/4/e8m0": BlockSpec("qsgd", 64, 4, "e8m0", levels=7),
    "sign_mean/fp32": BlockSpec("sign_mean", 128, 1, "fp32"),
    "sign_two/fp32": BlockSpec("sign_two", 128, 1, "fp32"),  # onebit reconstruction=two_means
    "sign_two/bf16": BlockSpec("sign_two", 64, 1, "bf16"),
    "sign_two/e8m0": BlockSpec("sign_two", 128, 1, "e8m0"),
    "sign": BlockSpec("sign", 64, 1, "none"),
    "ternary/2bit": BlockSpec("ternary", 64, 2, "fp32"),
    "ternary/base3": BlockSpec("ternary", 64, 0, "fp32"),
    "ternary/2bit/clip": BlockSpec("ternary", 96, 2, "fp32", clip=2.5),
    "ternary/base3/clip/bf16": BlockSpec("ternary", 64, 0, "bf16", clip=1.7),
    "ternary/base3/2048": BlockSpec("ternary", 2048, 0, "fp32"),  # several Philox chunks
    "qsgd/2": BlockSpec("qsgd", 64, 2, "fp32", levels=1),
    "qsgd/3": BlockSpec("qsgd", 64, 3, "fp32", levels=3),
    "qsgd/4": BlockSpec("qsgd", 2048, 4, "fp32", levels=7),
    "qsgd/6": BlockSpec("qsgd", 64, 6, "fp32", levels=31),  # 48-bit groups (64-bit words)
    "qsgd/8": BlockSpec("qsgd", 64, 8, "fp32", levels=127),
    "fp8_e4m3/fp32": BlockSpec("fp8_e4m3", 64, 8, "fp32"),
    "fp8_e4m3/bf16": BlockSpec("fp8_e4m3", 256, 8, "bf16"),  # 256: the Triton word decode
    "fp8_e4m3/e8m0": BlockSpec("fp8_e4m3", 72, 8, "e8m0"),
    "fp8_e5m2/fp32": BlockSpec("fp8_e5m2", 64, 8, "fp32"),
    "fp8_e5m2/e8m0": BlockSpec("fp8_e5m2", 256, 8, "e8m0"),
}


def bench_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """The benchmarks' rows: label → (scheme name, options)."""
    return {label: CODECS[case] for label, case in BENCH.items()}


# --------------------------------------------------------------------------- quantizers
RNG = np.random.default_rng(0)  # tests/test_quant_golden.py draws its other inputs from it too
W = (RNG.standard_normal((16, 24)) * 0.3).astype(np.float32)  # a weight (N=16, K=24)
A = np.abs(RNG.standard_normal((8, 24)) * 1.5).astype(np.float32)  # post-ReLU activations
A[0, :3] = 0.0
S = (RNG.standard_normal((8, 24)) * 2).astype(np.float32)  # signed activations

# name -> list of (id, kind, args, input, reference(x) -> (expected, compare-mask))
GOLDEN: dict[str, list[tuple[str, str, dict[str, Any], Any, Any]]] = {
    "int": [("w8_per_channel", "weight", {"bits": 8}, W, lambda x: np_int(x, 8, True)),
            ("w4_per_tensor", "weight", {"bits": 4, "per_channel": False}, W,
             lambda x: np_int(x, 4, False)),
            ("a8", "act", {"bits": 8}, S, lambda x: np_int(x, 8, False)),
            ("w4_g24", "weight", {"bits": 4, "group_size": 24}, W,
             lambda x: np_int_group(x, 4, 24)),
            ("w4_g12", "weight", {"bits": 4, "group_size": 12}, W,
             lambda x: np_int_group(x, 4, 12)),
            ("a8_per_token", "act", {"bits": 8, "per_token": True}, S,
             lambda x: np_int_token(x, 8))],
    "uint": [("w8_per_channel", "weight", {"bits": 8}, W, lambda x: np_uint(x, 8, True)),
             ("a4", "act", {"bits": 4}, A, lambda x: np_uint(x, 4, False)),
             ("a8_signed", "act", {"bits": 8}, S, lambda x: np_uint(x, 8, False)),
             ("w4_g8", "weight", {"bits": 4, "group_size": 8}, W,
              lambda x: np_uint_group(x, 4, 8)),
             ("a8_per_token", "act", {"bits": 8, "per_token": True}, S,
              lambda x: np_uint_token(x, 8))],
    "linear": [("w8_sf6", "weight", {"bits": 8, "frac_bits": 6}, W, lambda x: np_linear(x, 6, 8)),
               ("a4_sf1", "act", {"bits": 4, "frac_bits": 1}, S, lambda x: np_linear(x, 1, 4))],
    "dynamic_fixed": [("w8", "weight", {"bits": 8}, W, lambda x: np_dynamic_fixed(x, 8)),
                      ("a4", "act", {"bits": 4}, S, lambda x: np_dynamic_fixed(x, 4))],
    "qnn_linear": [("default8", "weight", {}, W, lambda x: np_qnn_linear(x, 2 ** -7, -1, 127 / 128)),
                   ("a4", "act", {"bits": 4, "step": 0.25, "min_val": 0.0, "max_val": 3.75}, S,
                    lambda x: np_qnn_linear(x, 0.25, 0.0, 3.75))],
    "minifloat": [("e4m3", "act", {"exp_bits": 4, "mant_bits": 3}, S * 50,
                   lambda x: np_minifloat(x, 4, 3)),
                  ("e2m1", "weight", {"exp_bits": 2, "mant_bits": 1}, W * 8,
                   lambda x: np_minifloat(x, 2, 1))],
    "lsq": [("w4", "weight", {"bits": 4}, W, lambda x: np_lsq(x, 4, True)),
            ("a4", "act", {"bits": 4}, A, lambda x: np_lsq(x, 4, False))],
    "pact": [("a4", "act", {"bits": 4, "init": 2.0}, S, lambda x: np_pact(x, 4, 2.0))],
    "log_linear": [("w5_sf2", "weight", {"bits": 5, "frac_bits": 2}, W,
                    lambda x: np_log_linear(x, 2, 5))],
    "ap2": [("w", "weight", {"max_val": 0.5}, W, lambda x: np_ap2(x, 0.5)),
            ("a", "act", {"max_val": 4.0}, A, lambda x: np_ap2(x, 4.0))],
    "log2": [("w3", "weight", {"bits": 3, "fsr": 0}, W, lambda x: np_log2(x, 3, 0)),
             ("a4", "act", {"bits": 4, "fsr": 2}, A, lambda x: np_log2(x, 4, 2))],
    "pow2": [("w5", "weight", {"bits": 5}, W, lambda x: np_pow2(x, 5)),
             ("w3", "weight", {"bits": 3}, W, lambda x: np_pow2(x, 3))],
    "tanh": [("w4", "weight", {"bits": 4}, W * 4, lambda x: np_tanh(x, 4)),
             ("a3", "act", {"bits": 3}, S, lambda x: np_tanh(x, 3))],
    "dorefa_w": [("k2", "weight", {"bits": 2}, W, lambda x: np_dorefa_w(x, 2)),
                 ("k4", "weight", {"bits": 4}, W, lambda x: np_dorefa_w(x, 4)),
                 ("k1", "weight", {"bits": 1}, W, lambda x: np_dorefa_w(x, 1))],
    "dorefa_a": [("k2", "act", {"bits": 2}, S / 2, lambda x: np_dorefa_a(x, 2))],
    "bnn_sign": [("w", "weight", {}, W, lambda x: (np_sign(x), np.ones_like(x, bool))),
                 ("a", "act", {}, S, lambda x: (np_sign(x), np.ones_like(x, bool)))],
    "binary_connect": [("w", "weight", {}, W, lambda x: (np_sign(x), np.ones_like(x, bool)))],
    "bwn": [("w", "weight", {}, W, np_bwn)],
    "horq": [("order2", "act", {"order": 2}, S, lambda x: np_horq(x, 2)),
             ("order3", "act", {"order": 3}, S, lambda x: np_horq(x, 3))],
    "absmean": [("w", "weight", {}, W, np_absmean)],
    "twn": [("w", "weight", {}, W, np_twn), ("t05", "weight", {"threshold": 0.5}, W,
                                            lambda x: np_twn(x, 0.5))],
    "ttq": [("w", "weight", {"threshold": 0.05, "init": 0.25}, W,
             lambda x: np_ttq(x, 0.05, 0.25, 0.25))],
    "flex": [("w", "weight", {}, W, np_flex), ("a", "act", {}, S * 1000, np_flex)],
    "balanced": [("k2", "weight", {"bits": 2}, W, lambda x: np_balanced(x, 2)),
                 ("k3_mean", "weight", {"bits": 3, "approx": "mean"}, W,
                  lambda x: np_balanced(x, 3, "mean"))],
    "aqn": [("k2", "weight", {"bits": 2, "iters": 2}, W, lambda x: np_aqn(x, 2, 2)),
            ("k3", "weight", {"bits": 3, "iters": 3}, W, lambda x: np_aqn(x, 3, 3))],
    "admm": [("ternary", "weight", {"bits": 2, "iters": 5}, W,  # eval: G = Proj(W), λ = 0
              lambda x: np_admm_projection(x, [-1, 0, 1], 5)),
             ("pow2", "weight", {"bits": 3, "iters": 5}, W,
              lambda x: np_admm_projection(x, [-4, -2, -1, 0, 1, 2, 4], 5)),
             ("binary", "weight", {"bits": 1, "iters": 3}, W,
              lambda x: np_admm_projection(x, [-1, 1], 3))],
    "hwgq": [("a2", "act", {"bits": 2}, S, lambda x: np_hwgq(x, hwgq_step(2), 3)),
             ("a3", "act", {"bits": 3}, S, lambda x: np_hwgq(x, hwgq_step(3), 7))],
    "pq": [("linear_k4_d4", "weight", {"bits": 2, "sub_dim": 4, "iters": 5}, W,
            lambda x: np_pq(x, 2, 4, 5)),
           ("conv_padded", "weight", {"bits": 3, "sub_dim": 4, "iters": 5}, W.reshape(16, 6, 2, 2),
            lambda x: np_pq(x, 3, 4, 5))],
    "bwnh": [("s_identity_is_bwn", "weight", {}, W, np_bwn)],  # with data: test_quant_seed_c
    "ffn": [("rank4", "weight", {"rank": 4, "iters": 3}, W, lambda x: np_sdd(x, 4, 3)),
            ("full_rank", "weight", {}, W, lambda x: np_sdd(x, 16, 10))],
    "tnn_a": [("a", "act", {}, S / 2, np_tnn), ("t03", "act", {"threshold": 0.3}, S / 2,
                                                  lambda x: np_tnn(x, 0.3))],
    "wage_w": [("k2", "weight", {"bits": 2}, W * 4, lambda x: np_wage_w(x, 2)),
               ("k3_conv", "weight", {"bits": 3}, (W * 2).reshape(16, 6, 2, 2),
                lambda x: np_wage_w(x, 3))],
    "wage_a": [("k8", "act", {}, S / 2, lambda x: np_wage_a(x, 8)),
               ("k4", "act", {"bits": 4}, S / 2, lambda x: np_wage_a(x, 4))],
    "wage_e": [],
    "kmeans": [("b2_linear", "weight", {"bits": 2}, W, lambda x: np_kmeans(x, 4, "linear")),
               ("b3_density", "weight", {"bits": 3, "centroid_init": "density"}, W,
                lambda x: np_kmeans(x, 8, "density"))],
    "inq": [("b5_first_stage", "weight", {"bits": 5}, W, lambda x: np_inq(x, 5, 0.5)),
            ("b3_all", "weight", {"bits": 3, "schedule": [1.0]}, W, lambda x: np_inq(x, 3, 1.0))],
    "shiftcnn": [("n2_b4", "weight", {}, W, lambda x: np_shiftcnn(x, 2, 4)),
                 ("n1_b3_per_channel", "weight", {"bits": 3, "terms": 1, "per_channel": True}, W,
                  lambda x: np_shiftcnn(x, 1, 3, True)),
                 ("n3_b2", "weight", {"bits": 2, "terms": 3}, W, lambda x: np_shiftcnn(x, 3, 2))],
    "slq": [("b4_first_stage", "weight", {"bits": 4, "schedule": [0.5, 1.0]}, W,
             lambda x: np_slq(x, 4, 0.5)),
            ("b2_all", "weight", {"bits": 2, "schedule": [1.0]}, W, lambda x: np_slq(x, 2, 1.0))],
    "ebp": [("map_sign", "weight", {}, W, lambda x: (np_sign(x), np.ones_like(x, bool)))],
    # these two need their layer / the backward pass: GOLDEN_ELSEWHERE
    "xnor": [],
    "dorefa_g": [],
}
GOLDEN_ELSEWHERE = {"xnor": "test_quant_golden.py::test_xnor_linear_and_conv_golden",
                    "dorefa_g": "test_quant_golden.py::test_dorefa_g_golden",
                    "wage_e": "test_quant_seed_c.py::test_wage_e_golden"}

EXPORT_ARGS: dict[str, dict[str, Any]] = {  # every weight quantizer, with the arguments it needs
    "int": {"bits": 8}, "uint": {"bits": 4}, "linear": {"bits": 8, "frac_bits": 6},
    "dynamic_fixed": {"bits": 8}, "qnn_linear": {"bits": 6}, "minifloat": {},
    "lsq": {"bits": 3}, "log_linear": {}, "ap2": {}, "log2": {"bits": 4}, "pow2": {},
    "tanh": {"bits": 3}, "dorefa_w": {"bits": 2}, "bnn_sign": {}, "binary_connect": {},
    "bwn": {}, "twn": {}, "ttq": {}, "flex": {}, "absmean": {},
    "balanced": {"bits": 2}, "aqn": {"bits": 3}, "admm": {"bits": 3},
    "pq": {"bits": 2, "sub_dim": 2}, "bwnh": {}, "ffn": {}, "wage_w": {"grad_bits": 8},
    "kmeans": {"bits": 2}, "inq": {"schedule": [0.5, 1.0], "stage_steps": 2}, "shiftcnn": {},
    "slq": {"bits": 2, "schedule": [0.5, 1.0], "stage_steps": 2}, "ebp": {},
}

STE_X = torch.linspace(-2.5, 2.5, 101).reshape(1, -1).repeat(3, 1) \
    * torch.tensor([[1.0], [0.7], [1.3]])
IDENTITY_STE: dict[str, tuple[str, torch.Tensor, dict[str, Any]]] = {  # name -> (kind, x, args)
    "linear": ("act", STE_X / 4, {"frac_bits": 6}),
    "dynamic_fixed": ("weight", STE_X, {}),
    "log_linear": ("weight", STE_X, {}),
    "ap2": ("weight", STE_X, {"max_val": 4.0}),
    "log2": ("weight", STE_X, {"bits": 3, "fsr": 2}),
    "pow2": ("weight", STE_X, {}),
    "tanh": ("weight", STE_X, {}),
    "twn": ("weight", STE_X, {}),
    "absmean": ("weight", STE_X, {}),
    "binary_connect": ("weight", STE_X, {}),
    "horq": ("act", STE_X, {}),
    "flex": ("weight", STE_X, {}),
    "balanced": ("weight", STE_X, {"bits": 2}),
    "aqn": ("weight", STE_X, {"bits": 2}),
    "admm": ("weight", STE_X, {}),  # the ADMM penalty gradient: tests/test_quant_admm.py
    "pq": ("weight", STE_X, {"bits": 1, "sub_dim": 4}), "bwnh": ("weight", STE_X, {}),
    "ffn": ("weight", STE_X, {"rank": 2}), "wage_w": ("weight", STE_X, {}),
    "shiftcnn": ("weight", STE_X, {}),
}
