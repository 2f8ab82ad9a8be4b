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
"""

from __future__ import annotations

from typing import Any

from dqt.kernels.blockq import BlockSpec

CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "onebit": ("onebit", {}),
    "onebit/bf16": ("onebit", {"scale_dtype": "bf16"}),
    "ef_signsgd": ("ef_signsgd", {}),
    "signsgd": ("signsgd", {}),
    "ternary_grad": ("ternary_grad", {}),
    "ternary_grad/base3": ("ternary_grad", {"format": "base3"}),
    "qsgd/2": ("qsgd", {"bits": 2}),
    "qsgd/3": ("qsgd", {"bits": 3}),
    "qsgd/4": ("qsgd", {"bits": 4}),
    "qsgd/8": ("qsgd", {"bits": 8}),
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
}

HOOK = ["onebit", "signsgd", "ef_signsgd", "ternary_grad", "ternary_grad/base3", "qsgd/4",
        "qsgd/3"]

SPECS: dict[str, BlockSpec] = {
    "onebit/bf16": BlockSpec("sign_mean", 64, 1, "bf16"),
    "onebit/e8m0": BlockSpec("sign_mean", 128, 1, "e8m0"),
    "qsgd/4/e8m0": BlockSpec("qsgd", 64, 4, "e8m0", levels=7),
    "sign_mean/fp32": BlockSpec("sign_mean", 128, 1, "fp32"),
    "sign": BlockSpec("sign", 64, 1, "none"),
    "ternary/2bit": BlockSpec("ternary", 64, 2, "fp32"),
    "ternary/base3": BlockSpec("ternary", 64, 0, "fp32"),
    "ternary/2bit/clip": BlockSpec("ternary", 96, 2, "fp32", clip=2.5),
    "ternary/base3/clip/bf16": BlockSpec("ternary", 64, 0, "bf16", clip=1.7),
    "qsgd/2": BlockSpec("qsgd", 64, 2, "fp32", levels=1),
    "qsgd/3": BlockSpec("qsgd", 64, 3, "fp32", levels=3),
    "qsgd/4": BlockSpec("qsgd", 2048, 4, "fp32", levels=7),
    "qsgd/6": BlockSpec("qsgd", 64, 6, "fp32", levels=31),  # 48-bit groups (64-bit words)
    "qsgd/8": BlockSpec("qsgd", 64, 8, "fp32", levels=127),
}


def bench_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """The benchmarks' rows: label → (scheme name, options)."""
    return {label: CODECS[case] for label, case in BENCH.items()}
