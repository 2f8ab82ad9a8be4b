"""Every registered quantizer against an independent numpy re-derivation of its published
formula (float64), plus the seed's three functions verbatim. Elements within 1e-4 of a rounding
boundary are left out of the comparison (fp32 vs fp64 may legitimately round them differently);
each case asserts that almost all elements are compared.

A quantizer registered without golden cases here fails ``test_every_quantizer_has_golden_cases``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dqt.quant import QUANTIZERS
from dqt.quant.dorefa import dorefa_grad
from dqt.quant.fixed_point import linear_quantize
from dqt.quant.log_quant import log_linear_quantize
from dqt.quant.tanh_quant import tanh_quantize
from tests.seed_c_refs import np_pq, np_sdd, np_tnn, np_wage_a, np_wage_w  # second-tier survey

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((16, 24)) * 0.3).astype(np.float32)  # a weight (N=16, K=24)
A = np.abs(RNG.standard_normal((8, 24)) * 1.5).astype(np.float32)  # post-ReLU activations
A[0, :3] = 0.0
S = (RNG.standard_normal((8, 24)) * 2).astype(np.float32)  # signed activations


def far(pre: np.ndarray, boundary_frac: float = 0.5) -> np.ndarray:
    """Elements of ``pre`` (the value about to be rounded) not within 1e-4 of a tie."""
    return np.abs(pre - np.floor(pre) - boundary_frac) > 1e-4


def rows_amax(x):
    return np.abs(x).max(axis=1, keepdims=True)


# ------------------------------------------------------------------ numpy references
def np_int(x, bits, per_channel):
    qm = 2 ** (bits - 1) - 1
    m = rows_amax(x) if per_channel else np.abs(x).max()
    s = m / qm
    pre = x / s
    return np.clip(np.round(pre), -qm, qm) * s, far(pre)


def np_uint(x, bits, per_channel):
    n = 2 ** bits - 1
    lo = np.minimum(x.min(axis=1, keepdims=True) if per_channel else x.min(), 0)
    hi = np.maximum(x.max(axis=1, keepdims=True) if per_channel else x.max(), 0)
    s = (hi - lo) / n
    z = np.clip(np.round(-lo / s), 0, n)
    pre = x / s
    q = np.clip(np.round(pre) + z, 0, n)
    return s * (q - z), far(pre)


def np_linear(x, sf, bits):
    d = 2.0 ** -sf
    pre = x / d + 0.5
    return np.clip(np.floor(pre), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * d, far(pre, 0.0)


def np_dynamic_fixed(x, bits):
    il = math.ceil(math.log2(np.abs(x).max())) + 1
    return np_linear(x, bits - il, bits)


def np_qnn_linear(x, step, lo, hi):
    pre = x / step
    return np.clip(np.round(pre) * step, lo, hi), far(pre)


def minifloat_grid(e, m):
    bias = 2 ** (e - 1) - 1
    vals = [0.0]
    for E in range(0, 2 ** e - 1):  # the all-ones exponent is a normal exponent here (no inf)
        for M in range(2 ** m):
            v = (M / 2 ** m) * 2.0 ** (1 - bias) if E == 0 else (1 + M / 2 ** m) * 2.0 ** (E - bias)
            vals.append(v)
    return np.array(sorted(set(vals)))


def np_minifloat(x, e, m):
    """Nearest value of the enumerated format (ties to the even mantissa), saturating."""
    grid = minifloat_grid(e, m)
    a = np.minimum(np.abs(x).astype(np.float64), grid[-1])
    i = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    pick_hi = (a - lo) > (hi - a)
    tie = np.abs((a - lo) - (hi - a)) <= 1e-12 * np.maximum(a, 1e-30)
    hi_even = (np.round(hi / np.maximum(hi - lo, 1e-45)) % 2 == 0)
    pick_hi = np.where(tie, hi_even, pick_hi)
    return np.sign(x) * np.where(pick_hi, hi, lo), np.ones_like(x, dtype=bool)


def np_lsq(x, bits, signed):
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    s = 2 * np.abs(x).mean() / math.sqrt(qp)
    pre = x / s
    return np.round(np.clip(pre, -qn, qp)) * s, far(pre)


def np_pact(x, bits, alpha):
    n = 2 ** bits - 1
    y = 0.5 * (np.abs(x) - np.abs(x - alpha) + alpha)
    pre = y * n / alpha
    return np.round(pre) * alpha / n, far(pre)


def np_log_linear(x, sf, bits):
    s = np.sign(x)
    lx = np.log(np.abs(x).astype(np.float64) + 1e-20)
    v, ok = np_linear(lx, sf, bits)
    return np.exp(v) * s, ok


def np_ap2(x, max_val):
    with np.errstate(divide="ignore"):
        lg = np.log2(np.abs(x).astype(np.float64))
    v = np.where(x == 0, 0.0, np.sign(x) * 2.0 ** np.round(lg))
    return np.clip(v, -max_val, max_val), far(np.nan_to_num(lg, neginf=0.0))


def np_log2(x, bits, fsr):
    with np.errstate(divide="ignore"):
        lg = np.log2(np.abs(x).astype(np.float64))
    e = np.clip(np.round(np.nan_to_num(lg, neginf=-1e9)), fsr - 2 ** bits, fsr)
    return np.where(x == 0, 0.0, np.sign(x) * 2.0 ** e), far(np.nan_to_num(lg, neginf=0.0))


def np_pow2(w, bits):
    """INQ eq. (4) literally: levels P = {0, 2^n2 .. 2^n1}; β where (α+β)/2 ≤ |w| < 3β/2."""
    s = np.abs(w).max()
    n1 = math.floor(math.log2(4 * s / 3))
    n2 = n1 + 1 - 2 ** (bits - 1) // 2
    levels = [0.0] + [2.0 ** k for k in range(n2, n1 + 1)]
    a = np.abs(w).astype(np.float64)
    out = np.zeros_like(a)
    ok = np.ones_like(a, dtype=bool)
    for lo, hi in zip(levels, levels[1:]):
        sel = ((lo + hi) / 2 <= a) & (a < 1.5 * hi)
        out = np.where(sel, hi, out)
        ok &= np.abs(a - (lo + hi) / 2) > 1e-6 * hi
        ok &= np.abs(a - 1.5 * hi) > 1e-6 * hi
    return np.sign(w) * out, ok


def np_tanh(x, bits):
    n = 2 ** bits - 1
    pre = (np.tanh(x.astype(np.float64)) + 1) / 2 * n + 0.5
    v = 2 * (np.floor(pre) / n) - 1
    v = np.clip(v, -(1 - 1 / n), 1 - 1 / n)
    return np.arctanh(v), far(pre, 0.0)


def np_dorefa_w(w, bits):
    if bits == 1:
        return np.abs(w).mean() * np.where(w >= 0, 1.0, -1.0), np.ones_like(w, dtype=bool)
    n = 2 ** bits - 1
    t = np.tanh(w.astype(np.float64))
    r = t / (2 * np.abs(t).max()) + 0.5
    return 2 * (np.round(r * n) / n) - 1, far(r * n)


def np_dorefa_a(a, bits):
    n = 2 ** bits - 1
    c = np.clip(a, 0, 1)
    return np.round(c * n) / n, far(c * n)


def np_fg(g, bits, u):
    n = 2 ** bits - 1
    m = np.abs(g).reshape(len(g), -1).max(axis=1).reshape(-1, *([1] * (g.ndim - 1)))
    x = g / (2 * m) + 0.5 + (u - 0.5) / n  # U(−½/n, ½/n)
    x = np.clip(x, 0, 1)
    return 2 * m * (np.round(x * n) / n - 0.5), far(x * n)


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def np_bwn(w):
    return np.abs(w).mean(axis=1, keepdims=True) * np_sign(w), np.ones_like(w, dtype=bool)


def np_horq(x, order):
    r = x.astype(np.float64)
    out = np.zeros_like(r)
    for _ in range(order):
        h = np.abs(r).mean(axis=-1, keepdims=True) * np_sign(r)
        out, r = out + h, r - h
    return out, np.ones_like(x, dtype=bool)


def np_twn(w, t=0.7):
    a = np.abs(w)
    delta = t * a.mean()
    mask = a > delta
    alpha = a[mask].mean()
    return alpha * np.sign(w) * mask, np.abs(a - delta) > 1e-6


def np_ttq(w, t, wp, wn):
    delta = t * np.abs(w).max()
    return np.where(w > delta, wp, np.where(w < -delta, -wn, 0.0)), np.abs(np.abs(w) - delta) > 1e-6


def np_flex(x):
    kappa = math.floor(math.log2(np.abs(x).max())) - 14
    s = 2.0 ** kappa
    pre = x / s
    return np.clip(np.round(pre), -2 ** 15, 2 ** 15 - 1) * s, far(pre)


def np_balanced(w, bits, approx="median"):
    """Recursive split at the median (or mean) → bin labels; uniform levels, least-squares α."""
    x = w.astype(np.float64).ravel()
    lab = np.zeros(x.size, dtype=np.int64)

    def split(idx, depth, base):
        if depth == bits:
            lab[idx] = base
            return
        m = np.median(x[idx]) if approx == "median" else x[idx].mean()
        split(idx[x[idx] < m], depth + 1, 2 * base)
        split(idx[x[idx] >= m], depth + 1, 2 * base + 1)

    split(np.arange(x.size), 0, 0)
    u = lab - ((1 << bits) - 1) / 2
    return ((x @ u) / (u @ u) * u).reshape(w.shape), np.ones(w.shape, bool)


def np_aqn(w, bits, iters):
    """Greedy init, then `iters` × (least squares α, brute-force nearest of the 2^k sums)."""
    pats = np.array(list(__import__("itertools").product((-1.0, 1.0), repeat=bits)))
    out = np.zeros(w.shape, np.float64)
    for r_i, row in enumerate(w.astype(np.float64)):
        r, cols = row.copy(), []
        for _ in range(bits):
            b = np_sign(r)
            cols.append(b)
            r = r - np.abs(r).mean() * b
        B = np.stack(cols, 1)
        a = np.array([0.0])
        for _ in range(iters):
            a = np.linalg.lstsq(B, row, rcond=None)[0]
            B = pats[np.argmin(np.abs(row[:, None] - (pats @ a)[None, :]), axis=1)]
        out[r_i] = B @ a
    return out, np.ones(w.shape, bool)


def np_admm_projection(w, levels, iters):
    """Proj onto {a·Q, Q ∈ levels^n}: a = mean|w|, Q = nearest level; then `iters` × (a = ⟨w,Q⟩
    /⟨Q,Q⟩, Q = nearest level of w/a)."""
    x, lv = w.astype(np.float64), np.asarray(levels, np.float64)
    a = np.abs(x).mean()
    q = lv[np.argmin(np.abs(x[..., None] / a - lv), axis=-1)]
    for _ in range(iters):
        a = (x * q).sum() / (q * q).sum()
        q = lv[np.argmin(np.abs(x[..., None] / a - lv), axis=-1)]
    return a * q, np.ones(w.shape, bool)


def np_hwgq(x, step, m):
    """Q(x) = 0 (x ≤ 0), iΔ on ((i − ½)Δ, (i + ½)Δ], Δ on (0, 1.5Δ], mΔ above (m − ½)Δ."""
    i = np.clip(np.ceil(x / step - 0.5), 1, m)
    return np.where(x > 0, i * step, 0.0), far(x / step, 0.5)


def hwgq_step(bits):
    """Δ minimizing E[(x − Q(x))², x > 0], x ~ N(0, 1), by direct numerical minimization."""
    from scipy.integrate import quad
    from scipy.optimize import minimize_scalar
    from scipy.stats import norm
    m = 2 ** bits - 1

    def mse(d):
        t = [0.0] + [(i + 0.5) * d for i in range(1, m)] + [np.inf]
        return sum(quad(lambda v: (v - (i + 1) * d) ** 2 * norm.pdf(v), t[i], t[i + 1])[0]
                   for i in range(m))
    return minimize_scalar(mse, bounds=(0.05, 2.0), method="bounded",
                           options={"xatol": 1e-10}).x
def np_kmeans(w, k, init):
    """Deep Compression: Lloyd's k-means on the values (argmin distance), linear / CDF init."""
    x = w.astype(np.float64).ravel()
    c = np.linspace(x.min(), x.max(), k) if init == "linear" else np.quantile(x, np.linspace(0, 1, k))
    lab = np.abs(x[:, None] - c[None]).argmin(1)
    for _ in range(100):
        c = np.array([x[lab == j].mean() if (lab == j).any() else c[j] for j in range(k)])
        new = np.abs(x[:, None] - c[None]).argmin(1)
        if (new == lab).all():
            break
        lab = new
    d = np.sort(np.abs(x[:, None] - c[None]), 1)
    return c[lab].reshape(w.shape), (d[:, 1] - d[:, 0] > 1e-6).reshape(w.shape)


def np_inq(w, bits, share):
    """INQ's first stage: the round(share·n) largest |w| on pow2's levels, the rest unchanged."""
    q, ok = np_pow2(w, bits)
    top = np.zeros(w.size, dtype=bool)
    top[np.argsort(-np.abs(w).ravel(), kind="stable")[:int(np.floor(share * w.size + 0.5))]] = True
    top = top.reshape(w.shape)
    return np.where(top, q, w), ok | ~top


def np_shiftcnn(w, terms, bits, per_channel=False):
    """ShiftCNN as gudovskiy/ShiftCNN's script: r = w/max|w|, greedy nearest power of two
    (border 1.5·2^k), zero below C_n's smallest magnitude 2^(−n−⌊M/2⌋+2), M = 2^B − 1."""
    m = rows_amax(w) if per_channel else np.abs(w).max()
    r = w.astype(np.float64) / m
    out, ok = np.zeros_like(r), np.ones_like(r, dtype=bool)
    for n in range(1, terms + 1):
        lg = np.log2(np.abs(r) + 1e-32)
        k = np.floor(lg)
        ok &= np.abs(lg - k - np.log2(1.5)) > 1e-4
        k = np.where(lg > k + np.log2(1.5), k + 1, k)
        q = np.where(k < -n - ((2 ** bits - 1) // 2) + 2, 0.0, np.sign(r) * 2.0 ** k)
        out, r = out + q, r - q
    return out * m, ok


# name -> list of (id, kind, args, input, reference(x) -> (expected, compare-mask))
GOLDEN = {
    "int": [("w8_per_channel", "weight", {"bits": 8}, W, lambda x: np_int(x, 8, True)),
            ("w4_per_tensor", "weight", {"bits": 4, "per_channel": False}, W,
             lambda x: np_int(x, 4, False)),
            ("a8", "act", {"bits": 8}, S, lambda x: np_int(x, 8, False))],
    "uint": [("w8_per_channel", "weight", {"bits": 8}, W, lambda x: np_uint(x, 8, True)),
             ("a4", "act", {"bits": 4}, A, lambda x: np_uint(x, 4, False)),
             ("a8_signed", "act", {"bits": 8}, S, lambda x: np_uint(x, 8, False))],
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
    # these two need their layer / the backward pass: golden tests below
    "xnor": [],
    "dorefa_g": [],
}
SPECIAL = {"xnor": "test_xnor_linear_and_conv_golden", "dorefa_g": "test_dorefa_g_golden",
           "wage_e": "test_quant_seed_c.py::test_wage_e_golden"}
CASES = [pytest.param(name, kind, args, x, ref, id=f"{name}-{cid}")
         for name, cases in GOLDEN.items() for cid, kind, args, x, ref in cases]


def test_every_quantizer_has_golden_cases():
    missing = [n for n in QUANTIZERS.names() if n not in GOLDEN]
    assert not missing, f"registered quantizers without golden cases: {missing}"
    for n in QUANTIZERS.names():
        assert GOLDEN[n] or n in SPECIAL, n


def make(name, kind, args):
    q = QUANTIZERS.get(name)(kind, **args)
    return q.eval()  # no stats recording; per-batch ranges where there is no state yet


@pytest.mark.parametrize("name,kind,args,x,ref", CASES)
def test_golden(name, kind, args, x, ref):
    q = make(name, kind, args)
    xt = torch.from_numpy(x.copy())
    with torch.no_grad():
        q.init_from(xt) if kind == "weight" else None
        y = q(xt).numpy().astype(np.float64)
    expected, ok = ref(x)
    assert ok.mean() > 0.9, f"only {ok.mean():.2f} of the elements are compared"
    tol = 1e-5 * max(1.0, float(np.abs(expected[ok]).max()))
    np.testing.assert_allclose(y[ok], expected[ok], rtol=1e-5, atol=tol)
    assert not np.array_equal(y, x.astype(np.float64)), "the quantizer changed nothing"


def test_minifloat_e5m10_is_ieee_half():
    x = (RNG.standard_normal(4000) * np.exp(RNG.uniform(-12, 10, 4000))).astype(np.float32)
    x = x[np.abs(x) < 60000]
    q = make("minifloat", "act", {"exp_bits": 5, "mant_bits": 10})
    y = q(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    assert float(q(torch.tensor([1e6]))) == 65504.0  # saturates instead of inf


# ------------------------------------------------------------------ the seed, verbatim
def test_seed_linear_quantize_verbatim():
    x = torch.from_numpy(S)
    np.testing.assert_allclose(linear_quantize(x, 3, 6).numpy(), np_linear(S, 3, 6)[0], atol=1e-6)
    # the 1-bit branch as written in the seed: sign(x) − 1
    assert linear_quantize(torch.tensor([-2.0, 0.0, 3.0]), 0, 1).tolist() == [-2.0, -1.0, 0.0]


def test_seed_log_linear_quantize_verbatim():
    x = torch.from_numpy(S)
    y = log_linear_quantize(x, 2, 5).numpy()
    np.testing.assert_allclose(y, np_log_linear(S, 2, 5)[0], rtol=1e-5)
    assert log_linear_quantize(torch.tensor([-2.0, 3.0]), 0, 1).tolist() == [-1.0, 1.0]


def test_seed_tanh_quantize_verbatim_has_infinite_outer_levels():
    y = tanh_quantize(torch.tensor([-5.0, 0.3, 5.0]), 3)
    assert y[0] == -math.inf and y[2] == math.inf
    n = 7
    v = 2 * (math.floor((math.tanh(0.3) + 1) / 2 * n + 0.5) / n) - 1
    assert float(y[1]) == pytest.approx(math.atanh(v), rel=1e-6)
    # the registered quantizer decodes them at atanh(±(1 − 1/n)) instead
    q = make("tanh", "act", {"bits": 3})
    assert float(q(torch.tensor([5.0]))) == pytest.approx(math.atanh(1 - 1 / n), rel=1e-6)


# ------------------------------------------------------------------ need a layer / backward
def test_xnor_linear_and_conv_golden():
    from dqt.quant.prepare import prepare
    from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig

    torch.manual_seed(0)
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="bwn"),
                                                      act=QuantizerConfig(name="xnor")),
                    keep_first_last=False)
    lin, conv = nn.Linear(24, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1)
    m = prepare(nn.ModuleDict({"lin": lin, "conv": conv}), cfg)
    x = torch.from_numpy(S)
    wl, bl = lin.parametrizations.weight.original.detach().numpy(), lin.bias.detach().numpy()
    beta = np.abs(S).mean(axis=1, keepdims=True)
    ref = (np_sign(S) @ np_bwn(wl)[0].T) * beta + bl
    np.testing.assert_allclose(m["lin"](x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)

    xi = RNG.standard_normal((2, 3, 7, 7)).astype(np.float32)
    wc = conv.parametrizations.weight.original.detach().numpy()
    bc = conv.bias.detach().numpy()
    wb = np.abs(wc).reshape(4, -1).mean(1)[:, None, None, None] * np_sign(wc)
    xp = np.pad(xi, ((0, 0), (0, 0), (1, 1), (1, 1)))
    a = np.abs(xp).mean(axis=1)  # A = mean_c |I| (zero padding)
    out = np.zeros((2, 4, 4, 4))
    # torch pads sign(I) with zeros (sign is applied before the conv's own zero padding)
    sign_i = np_sign(xi)
    sp = np.pad(sign_i, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(4):
        for j in range(4):
            k = a[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].mean(axis=(1, 2))
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", sp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3],
                                        wb) * k[:, None] + bc
    y = m["conv"](torch.from_numpy(xi)).detach().numpy()
    np.testing.assert_allclose(y, out, rtol=1e-5, atol=1e-5)


def test_dorefa_g_golden():
    g = (RNG.standard_normal((4, 3, 5)) * 1e-3).astype(np.float32)
    u = RNG.uniform(size=g.shape).astype(np.float32)
    y = dorefa_grad(torch.from_numpy(g), 4, torch.from_numpy(u)).numpy()
    expected, ok = np_fg(g, 4, u)
    assert ok.mean() > 0.95
    np.testing.assert_allclose(y[ok], expected[ok], rtol=1e-5, atol=1e-9)
    # the registered quantizer: identity forward, fg on the backward with torch's uniforms
    q = make("dorefa_g", "grad", {"bits": 4})
    x = torch.randn(4, 3, 5, requires_grad=True)
    out = q(x)
    assert torch.equal(out, x)
    torch.manual_seed(7)
    out.backward(torch.from_numpy(g))
    torch.manual_seed(7)
    u2 = torch.rand(4, 3, 5).numpy()
    expected2, ok2 = np_fg(g, 4, u2)
    np.testing.assert_allclose(x.grad.numpy()[ok2], expected2[ok2], rtol=1e-5, atol=1e-9)


def test_stochastic_binarization_has_hard_sigmoid_probability():
    torch.manual_seed(0)
    q = QUANTIZERS.get("bnn_sign")("act", stochastic=True).train()
    x = torch.tensor([-1.5, -0.5, 0.0, 0.4, 2.0]).repeat(20000, 1)
    p_plus = (q(x) > 0).float().mean(0)
    expected = np.clip((np.array([-1.5, -0.5, 0.0, 0.4, 2.0]) + 1) / 2, 0, 1)
    np.testing.assert_allclose(p_plus.numpy(), expected, atol=0.015)
    assert torch.equal(q.eval()(x[:1]), torch.tensor([[-1.0, -1.0, 1.0, 1.0, 1.0]]))
