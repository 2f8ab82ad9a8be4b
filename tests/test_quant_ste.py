"""Straight-through estimators and the papers' gradients: the actual masks and scales.

Every registered quantizer has an entry in ``STE`` (checked), so a new quantizer without a
gradient test fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from dqt.quant import QUANTIZERS
from tests.cases import IDENTITY_STE as IDENTITY  # name -> (kind, input, args): identity STE
from tests.cases import STE_X as X


def make(name, kind, **args):
    return QUANTIZERS.get(name)(kind, **args)


def grad_of(q, x, g=None):
    x = x.clone().requires_grad_(True)
    y = q(x)
    g = torch.randn_like(y) if g is None else g
    y.backward(g)
    return x.grad, g, y


def same(got, expected):
    """Equal up to the ulp that s·(1/s) can cost; zeros (the masks) exactly zero."""
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert torch.equal(got == 0, expected == 0)


def check_identity(name, kind, x, **args):
    q = make(name, kind, **args).eval()
    if kind == "weight":
        q.init_from(x)
    gx, g, _ = grad_of(q, x)
    same(gx, g)


def check_mask(name, kind, x, mask_fn, **args):
    q = make(name, kind, **args).eval()
    gx, g, _ = grad_of(q, x)
    mask = mask_fn(x)
    assert 0 < mask.float().mean() < 1, "the test input must exercise both sides of the mask"
    same(gx, g * mask)


def test_int_and_uint_activation_grad_is_the_range_mask():
    q = make("int", "act", bits=8).eval()
    q.observer.lo.fill_(-1.0), q.observer.hi.fill_(1.0), q.observer.initialized.fill_(True)
    gx, g, _ = grad_of(q, X)
    same(gx, g * (X.abs() <= 1.0))
    q = make("uint", "act", bits=4).eval()
    q.observer.lo.fill_(0.0), q.observer.hi.fill_(1.5), q.observer.initialized.fill_(True)
    gx, g, _ = grad_of(q, X)
    s, z = 1.5 / 15, 0.0
    inside = (torch.round(X / s) + z >= 0) & (torch.round(X / s) + z <= 15)
    same(gx, g * inside)


def test_bnn_sign_hardtanh_ste():
    check_mask("bnn_sign", "act", X, lambda x: x.abs() <= 1)
    check_mask("bnn_sign", "weight", X, lambda x: x.abs() <= 1)


def test_xnor_input_hardtanh_ste():
    from torch import nn
    q = make("xnor", "act")
    q.bind(nn.Linear(101, 2))
    gx, g, _ = grad_of(q, X)
    same(gx, g * (X.abs() <= 1))


def test_dorefa_a_clip_mask():
    check_mask("dorefa_a", "act", X, lambda x: (x >= 0) & (x <= 1), bits=2)


def test_dorefa_w_grad_is_that_of_the_unrounded_formula():
    w = torch.randn(6, 10) * 0.4
    q = make("dorefa_w", "weight", bits=2)
    gx, g, _ = grad_of(q, w)
    w2 = w.clone().requires_grad_(True)
    t = torch.tanh(w2)
    (2 * (t / (2 * t.abs().max()) + 0.5) - 1).backward(g)  # the max is not stop-gradiented
    torch.testing.assert_close(gx, w2.grad)
    check_identity("dorefa_w", "weight", w, bits=1)  # k = 1: identity STE


def test_bwn_paper_gradient():
    w = torch.randn(4, 9) * 0.8
    w[0, 0], w[1, 1] = 1.5, -2.0  # outside the STE window
    q = make("bwn", "weight")
    gx, g, _ = grad_of(q, w)
    alpha = w.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(gx, g * (1 / 9 + alpha * (w.abs() <= 1)))


def test_ttq_gradients():
    w = torch.randn(5, 8) * 0.3
    q = make("ttq", "weight", threshold=0.2, init=0.5)
    q.init_from(w)
    with torch.no_grad():
        q.w_p.fill_(0.7), q.w_n.fill_(0.4)
    gx, g, y = grad_of(q, w)
    d = 0.2 * w.abs().max()
    pos, neg = w > d, w < -d
    assert torch.equal(y.detach(), torch.where(pos, 0.7, 0.0) - torch.where(neg, 0.4, 0.0))
    torch.testing.assert_close(gx, g * torch.where(pos, 0.7, torch.where(neg, 0.4, 1.0)))
    torch.testing.assert_close(q.w_p.grad, (g * pos).sum())
    torch.testing.assert_close(q.w_n.grad, -(g * neg).sum())


def test_lsq_gradients_and_scale():
    v = torch.linspace(-3, 3, 61).reshape(1, -1)
    q = make("lsq", "weight", bits=3, init=0.5)
    gx, g, _ = grad_of(q, v)
    qn, qp, s = 4, 3, 0.5
    r = v / s
    inside = (r >= -qn) & (r <= qp)
    same(gx, g * inside)
    ds = torch.where(r < -qn, -qn, torch.where(r > qp, qp, -r + torch.round(r)))
    expected = (g * ds).sum() / math.sqrt(v.numel() * qp)
    torch.testing.assert_close(q.s.grad, expected)


def test_pact_gradients():
    x = torch.linspace(-1, 4, 51).reshape(1, -1)
    q = make("pact", "act", bits=2, init=2.0)
    gx, g, _ = grad_of(q, x)
    same(gx, g * ((x >= 0) & (x < 2.0)))
    torch.testing.assert_close(q.alpha.grad, (g * (x >= 2.0)).sum())


def test_minifloat_saturation_mask():
    check_mask("minifloat", "act", X * 200, lambda x: x.abs() <= 240.0, exp_bits=4, mant_bits=3)


def test_flex_grad_quantizer_quantizes_the_backward_only():
    q = make("flex", "grad").train()
    x = torch.randn(4, 6, requires_grad=True)
    y = q(x)
    assert torch.equal(y, x)
    g = torch.randn(4, 6) * 1e-3
    y.backward(g)
    kappa = math.floor(math.log2(g.abs().max())) - 14
    expected = torch.clamp(torch.round(g / 2 ** kappa), -2 ** 15, 2 ** 15 - 1) * 2 ** kappa
    assert torch.equal(x.grad, expected)
    assert float(q.stats()[0]) == float(g.abs().max())  # recorded for Autoflex


def test_grad_quantizers_keep_non_finite_gradients():
    for name in ("dorefa_g", "flex"):
        q = make(name, "grad").train()
        x = torch.randn(2, 3, requires_grad=True)
        g = torch.ones(2, 3)
        g[0, 0] = math.inf
        q(x).backward(g)
        assert not torch.isfinite(x.grad).all(), name


@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identity_ste(name):
    kind, x, args = IDENTITY[name]
    check_identity(name, kind, x, **args)


def test_qnn_linear_clip_mask():
    check_mask("qnn_linear", "act", X, lambda x: (torch.round(x / 0.25) >= 0)
               & (torch.round(x / 0.25) <= 15), bits=4, step=0.25, min_val=0.0, max_val=3.75)


def test_hwgq_clipped_relu_ste():
    qm = float(make("hwgq", "act", bits=2).levels[-1])  # q_m = 3Δ, Δ ≈ 0.538
    assert abs(qm - 3 * 0.538) < 0.005
    check_mask("hwgq", "act", X, lambda x: (x > 0) & (x <= qm), bits=2)


STE = {"hwgq", "int", "uint", "bnn_sign", "xnor", "dorefa_a", "dorefa_w", "bwn", "ttq", "lsq",
       "pact", "minifloat", "dorefa_g", "qnn_linear", *IDENTITY,
       "tnn_a", "wage_a", "wage_e"}  # tests in test_quant_seed_c.py (and wage_w's Q_G there)


def test_every_quantizer_has_a_gradient_test():
    missing = sorted(set(QUANTIZERS.names()) - STE)
    assert not missing, f"registered quantizers without an STE/gradient test: {missing}"


def test_fake_quant_runs_in_fp32_under_autocast():
    q = make("dorefa_w", "weight", bits=2)
    w = torch.randn(8, 16)
    ref = q(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(w.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), q(w.to(torch.bfloat16).float()).to(torch.bfloat16).float())
    assert ref.dtype == torch.float32


def test_kmeans_grad_sums_each_cluster_and_stops_at_the_weight():
    """Deep Compression eq. 3: ∂L/∂c_j = Σ_{idx_i = j} ∂L/∂W_q[i]; the weight gets 0 (shared)."""
    q = make("kmeans", "weight", bits=2, cluster_step=1)
    w = X.clone()
    q.init_from(w)
    gx, g, y = grad_of(q, w)  # before clustering: identity, zero centroid gradient
    same(gx, g)
    assert torch.equal(q.centroids.grad, torch.zeros(4))
    q.centroids.grad = None
    q.after_step(w)  # step 1 = cluster_step: clustered now
    gx, g, y = grad_of(q, w)
    idx = q.index.long()
    expected = torch.stack([g[idx == j].double().sum() for j in range(4)])
    # an fp32 sum of n terms in any order is within n·2⁻²⁴·Σ|terms| of the exact sum
    bound = torch.stack([(idx == j).sum() * 2.0 ** -24 * g[idx == j].double().abs().sum()
                         for j in range(4)])
    assert ((q.centroids.grad.double() - expected).abs() <= bound).all(), \
        (q.centroids.grad, expected, bound)
    assert torch.equal(gx, torch.zeros_like(w))
    assert torch.equal(y, q.centroids.detach()[idx])


def test_inq_grad_is_zero_on_frozen_weights_identity_elsewhere():
    q = make("inq", "weight", schedule=[0.5, 0.75], stage_steps=1)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    q.init_from(w)
    frozen = q.frozen.clone()
    assert frozen.float().mean() == 0.5
    assert torch.equal(frozen, w.abs() >= w.abs().flatten().kthvalue(65).values)
    gx, g, _ = grad_of(q, w)
    same(gx, g * ~frozen)
    q.after_step(w)
    assert q.frozen.float().mean() == 0.75
    gx, g, _ = grad_of(q, w)
    same(gx, g * ~q.frozen)


STE |= {"kmeans", "inq"}


def test_slq_grad_is_zero_on_frozen_weights_identity_elsewhere():
    q = make("slq", "weight", bits=2, schedule=[0.5, 1.0], stage_steps=1)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    q.init_from(w)
    frozen = q.frozen.clone()
    assert 0 < frozen.float().mean() < 1 and int(q.used) == 2
    gx, g, _ = grad_of(q, w)
    same(gx, g * ~frozen)
    q.after_step(w)
    assert q.frozen.all()
    gx, g, _ = grad_of(q, w)
    assert torch.equal(gx, torch.zeros_like(w))


def test_ebp_grad_is_the_gradient_of_the_mean_weight_in_training_and_in_eval():
    """EBP's update moves h by ∂L/∂⟨w⟩: the identity from the mean (training) or the sign
    (evaluation) back to the weight."""
    q = make("ebp", "weight")
    for mode in (q.train(), q.eval()):
        gx, g, y = grad_of(mode, X)
        same(gx, g)
    assert torch.equal(q.eval()(X).abs(), torch.ones_like(X))


STE |= {"slq", "ebp"}


def test_the_forward_keeps_the_sign_of_zero():
    """The STE's forward is the quantized value bit for bit, −0 included (an STE written
    ``q + (x − x.detach())`` turns −0 into +0)."""
    from dqt.quant.ste import round_ste

    x = torch.tensor([-0.0, 0.0, -1e-30, 1e-30, -0.3, 0.3, -0.7], requires_grad=True)
    y = make("minifloat", "weight").quantize(x)
    assert torch.signbit(y).tolist() == [True, False, True, False, True, False, True]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(7))  # the STE's gradient is unchanged
    r = round_ste(x)
    assert torch.signbit(r).tolist() == [True, False, True, False, True, False, True]
