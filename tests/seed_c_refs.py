"""Independent float64 numpy re-derivations (plain loops, written from the papers' formulas) of
the second-tier survey methods: Q-CNN product quantization, BWNH, FFN's semi-discrete
decomposition, TNN ternary activations and WAGE. Used by tests/test_quant_golden.py and
tests/test_quant_seed_c.py. Each returns (expected, compare-mask) like the golden references."""

from __future__ import annotations

import math

import numpy as np
import torch


def np_far(pre, frac=0.5):
    return np.abs(pre - np.floor(pre) - frac) > 1e-4


# ------------------------------------------------------------------ Q-CNN
def np_pq(w, bits, d, iters, seed=0):
    """k-means per subspace; subspace (p, m) = channels m·d..(m+1)·d (zero-padded) at kernel
    position p; starting codewords: the sub-vectors at torch.randperm(N, seed)[:K]."""
    w = w.astype(np.float64)
    n = w.shape[0]
    w3 = w.reshape(n, w.shape[1], -1) if w.ndim > 1 else w.reshape(n, 1, 1)
    c, p = w3.shape[1], w3.shape[2]
    m = -(-c // d)
    k = min(2 ** bits, n)
    start = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].numpy()
    out = np.zeros((n, m * d, p))
    for pos in range(p):
        for g in range(m):
            v = np.zeros((n, d))
            for j in range(d):
                ch = g * d + j
                if ch < c:
                    v[:, j] = w3[:, ch, pos]
            cb = v[start].copy()
            for _ in range(iters + 1):
                idx = np.array([np.argmin([((v[i] - cb[q]) ** 2).sum() for q in range(k)])
                                for i in range(n)])
                if _ == iters:
                    break
                for q in range(k):
                    if (idx == q).any():
                        cb[q] = v[idx == q].mean(axis=0)
            for i in range(n):
                out[i, g * d:(g + 1) * d, pos] = cb[idx[i]]
    return out[:, :c].reshape(w.shape), np.ones(w.shape, dtype=bool)


# ------------------------------------------------------------------ BWNH
def np_bwnh(w, s, iters):
    """Per channel: b = sign(w); α = bᵀSw/bᵀSb; sweeps of b_j = sign((Sw)_j − α Σ_{i≠j} S_ji b_i)."""
    w = w.astype(np.float64).reshape(w.shape[0], -1)
    s = s.astype(np.float64)
    out = np.zeros_like(w)
    for n in range(w.shape[0]):
        b = np.where(w[n] >= 0, 1.0, -1.0)
        a = max(b @ s @ w[n] / (b @ s @ b), 0.0)
        for _ in range(iters):
            for j in range(len(b)):
                v = (s @ w[n])[j] - a * sum(s[j, i] * b[i] for i in range(len(b)) if i != j)
                if v != 0:
                    b[j] = 1.0 if v > 0 else -1.0
            a = max(b @ s @ w[n] / (b @ s @ b), 0.0)
        out[n] = a * b
    return out, np.ones_like(out, dtype=bool)


# ------------------------------------------------------------------ FFN
def np_ternary_max(s):
    """max over ternary x ≠ 0 of (xᵀs)²/‖x‖², by brute force over the number of nonzeros J."""
    order = sorted(range(len(s)), key=lambda i: -abs(s[i]))  # stable: ties keep index order
    best, best_j = -1.0, 0
    for j in range(1, len(s) + 1):
        val = sum(abs(s[i]) for i in order[:j]) ** 2 / j
        if val > best:
            best, best_j = val, j
    x = np.zeros(len(s))
    for i in order[:best_j]:
        x[i] = np.sign(s[i])
    return x


def np_sdd(w, rank, iters):
    w = w.astype(np.float64).reshape(w.shape[0], -1)
    r = w.copy()
    approx = np.zeros_like(w)
    for _ in range(rank):
        y = np.zeros(w.shape[1])
        y[np.argmax((r ** 2).sum(axis=0))] = 1.0
        x = np_ternary_max(r @ y)
        for _ in range(iters):
            y = np_ternary_max(r.T @ x)
            x = np_ternary_max(r @ y)
        d = x @ r @ y / ((x @ x) * (y @ y)) if (x @ x) * (y @ y) > 0 else 0.0
        r = r - d * np.outer(x, y)
        approx = approx + d * np.outer(x, y)
    return approx, np.ones_like(approx, dtype=bool)


# ------------------------------------------------------------------ TNN
def np_tnn(x, delta=0.5):
    return np.where(x > delta, 1.0, np.where(x < -delta, -1.0, 0.0)), np.abs(np.abs(x) - delta) > 1e-6


# ------------------------------------------------------------------ WAGE
def sigma(k):
    return 2.0 ** (1 - k)


def np_shift(x):
    return 2.0 ** np.round(np.log2(x))


def np_wage_w(w, k):
    """Q(C(W, k), k) / α, α = max(Shift(1.5σ / √(3/fan_in)), 1) (divided only when > 1.8)."""
    s = sigma(k)
    fan_in = int(np.prod(w.shape[1:]))
    alpha = 2.0 ** round(math.log2(1.5 * s / math.sqrt(3.0 / fan_in)))
    alpha = alpha if alpha > 1.8 else 1.0
    c = np.clip(w.astype(np.float64), -1 + s, 1 - s)
    return np.round(c / s) * s / alpha, np_far(c / s)


def np_wage_a(x, k):
    s = sigma(k)
    c = np.clip(x.astype(np.float64), -1 + s, 1 - s)
    return np.round(c / s) * s, np_far(c / s)


def np_wage_e(e, k, rescale=False):
    s = sigma(k)
    sh = np_shift(np.abs(e).max())
    c = np.clip(e.astype(np.float64) / sh, -1 + s, 1 - s)
    return np.round(c / s) * s * (sh if rescale else 1.0), np_far(c / s)


def np_wage_g(g, k, lr, u):
    gs = lr * g.astype(np.float64) / np_shift(np.abs(g).max())
    a = np.abs(gs)
    return sigma(k) * np.sign(gs) * (np.floor(a) + (u < a - np.floor(a))), \
        np.abs(a - np.floor(a) - u) > 1e-6


def np_pq_error_correct(w, s, cb, idx, d):
    """One round of Q-CNN's error correction for a Linear weight (N, C), C = M·d, from codebooks
    cb (M, K, d) / indices idx (M, N): per subspace m (columns I), with the other subspaces'
    errors e fixed, t_n = Σ_{j∉I} S_Ij e_nj; assign argmin_k (w−c_k)ᵀS_II(w−c_k) + 2(w−c_k)ᵀt_n;
    c_k = mean w + S_II⁻¹ mean t over its members."""
    w = w.astype(np.float64)
    s = s.astype(np.float64)
    cb = cb.astype(np.float64).copy()
    idx = idx.copy()
    n, c = w.shape
    what = np.zeros_like(w)
    for g in range(c // d):
        what[:, g * d:(g + 1) * d] = cb[g][idx[g]]
    for g in range(c // d):
        cols = list(range(g * d, (g + 1) * d))
        rest = [j for j in range(c) if j not in cols]
        e = w - what
        a = s[np.ix_(cols, cols)]
        for i in range(n):
            t = s[np.ix_(cols, rest)] @ e[i, rest]
            costs = [(w[i, cols] - cb[g][k]) @ a @ (w[i, cols] - cb[g][k])
                     + 2 * (w[i, cols] - cb[g][k]) @ t for k in range(cb.shape[1])]
            idx[g][i] = int(np.argmin(costs))
        for k in range(cb.shape[1]):
            mem = [i for i in range(n) if idx[g][i] == k]
            if mem:
                ts = np.array([s[np.ix_(cols, rest)] @ e[i, rest] for i in mem])
                cb[g][k] = w[mem][:, cols].mean(0) + np.linalg.solve(a, ts.mean(0))
        what[:, cols] = cb[g][idx[g]]
    return what
