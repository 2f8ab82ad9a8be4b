"""Independent float64 numpy re-derivations of the registered quantizers' published formulas:
the references of the golden cases (``tests/cases.py``, run by ``tests/test_quant_golden.py``).
Each returns (expected, compare-mask): elements within 1e-4 of a rounding boundary are left out
of the comparison (fp32 vs fp64 may legitimately round them differently)."""

from __future__ import annotations

import math

import numpy as np


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


def np_int_group(w, bits, g):
    """torchao's symmetric per-group INT-k: S = max|w_g| / ((2^k − 1)/2),
    q ∈ [−2^(k−1), 2^(k−1) − 1]."""
    wg = w.reshape(w.shape[0], -1, g)
    s = np.maximum(np.abs(wg).max(axis=-1, keepdims=True) / ((2 ** bits - 1) / 2),
                   np.finfo(np.float32).tiny)
    pre = wg / s
    q = np.clip(np.round(pre), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (q * s).reshape(w.shape), far(pre).reshape(w.shape)


def np_uint_group(w, bits, g):
    wg = w.reshape(w.shape[0], -1, g)
    y, ok = np_uint(wg.reshape(-1, g), bits, True)
    return y.reshape(w.shape), ok.reshape(w.shape)


def np_uint_token(x, bits):
    """torchao's per-token asymmetric (on [0, 2^k − 1]; its int8 codes are these − 128)."""
    n = 2 ** bits - 1
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0)
    hi = np.maximum(x.max(axis=-1, keepdims=True), 0)
    s = np.maximum((hi - lo) / n, np.finfo(np.float32).tiny)
    z = np.clip(-np.round(lo / s), 0, n)
    pre = x / s
    q = np.clip(np.round(pre) + z, 0, n)
    return (q - z) * s, far(pre)


def np_int_token(x, bits):
    """BitNet's absmax per token: s = (2^(k−1) − 1)/max|x|, x̂ = clamp(round(x·s))/s."""
    qm = 2 ** (bits - 1) - 1
    s = qm / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    pre = x * s
    return np.clip(np.round(pre), -qm - 1, qm) / s, far(pre)


def np_absmean(w):
    """BitNet b1.58: γ = mean|W|, W_q = clamp(round(W/(γ + 1e−5)), −1, 1)·γ."""
    g = np.abs(w).mean()
    pre = w / (g + 1e-5)
    return np.clip(np.round(pre), -1, 1) * g, far(pre)


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


def np_slq(w, bits, share):
    """SLQ's first stage: k-means (linear init) into K = 2^bits clusters, loss E_j = Σ (w − c_j)²
    per cluster, the round(share·K) clusters of lowest E on their centroid, the rest unchanged.
    Compared: weights away from a cluster border, and not in a cluster whose loss ties the
    cut."""
    k = 2 ** bits
    x = w.astype(np.float64).ravel()
    c = np.linspace(x.min(), x.max(), k)
    lab = np.abs(x[:, None] - c[None]).argmin(1)
    for _ in range(100):
        c = np.array([x[lab == j].mean() if (lab == j).any() else c[j] for j in range(k)])
        new = np.abs(x[:, None] - c[None]).argmin(1)
        if (new == lab).all():
            break
        lab = new
    loss = np.array([((x[lab == j] - c[j]) ** 2).sum() if (lab == j).any() else np.inf
                     for j in range(k)])
    m = int(np.floor(share * k + 0.5))
    pick = np.argsort(loss, kind="stable")[:m]
    q = np.isin(lab, pick)
    d = np.sort(np.abs(x[:, None] - c[None]), 1)
    ok = d[:, 1] - d[:, 0] > 1e-6
    if 0 < m < k:  # a loss within 1e-9 of the cut could go either way in fp32
        cut = np.sort(loss)[m - 1:m + 1]
        ok &= ~(abs(cut[1] - cut[0]) < 1e-9 * max(1.0, cut[0]))
    return np.where(q, c[lab], x).reshape(w.shape), ok.reshape(w.shape)


def np_slq_stage(free, k, n_pick):
    """One SLQ stage on the free values: k-means (linear init) into k clusters; (the boolean
    mask of the free values in the n_pick clusters of lowest loss, their centroid values, the
    sorted losses)."""
    x = free.astype(np.float64).ravel()
    c = np.linspace(x.min(), x.max(), k)
    lab = np.abs(x[:, None] - c[None]).argmin(1)
    for _ in range(100):
        c = np.array([x[lab == j].mean() if (lab == j).any() else c[j] for j in range(k)])
        new = np.abs(x[:, None] - c[None]).argmin(1)
        if (new == lab).all():
            break
        lab = new
    loss = np.array([((x[lab == j] - c[j]) ** 2).sum() if (lab == j).any() else np.inf
                     for j in range(k)])
    pick = np.argsort(loss, kind="stable")[:n_pick]
    return np.isin(lab, pick), c[lab], np.sort(loss)
