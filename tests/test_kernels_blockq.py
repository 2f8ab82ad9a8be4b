"""dqt.kernels.blockq: every implementation (C on CPU, Triton — through the interpreter on CPU,
on the GPU when there is one — and the pure-torch reference) produces the same message bytes,
the same residuals, the same non-finite flags and the same decoded values (docs/design.md,
invariant 2), parametrized over every kind, code width, scale format and block size, on tables
whose blocks sit at arbitrary offsets (as bucket layouts make them), with error feedback and a
loss scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from dqt.kernels import blockq
from dqt.kernels.blockq import BlockSpec, available_impls, table_from_rows
from tests.cases import SPECS

# the interpreter computes NaN·0 and NaN − x of non-finite blocks in numpy, which warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
FAST = [i for i in available_impls("cpu") if i != "reference"]


def _scattered_table(spec: BlockSpec, lengths: list[int], gen: torch.Generator):
    """Blocks at shuffled, gapped data/residual offsets, two messages with their own scale and
    code areas — the shape of a real bucket layout. Returns (table, data size, message bytes)."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    data_off, pos = {}, 0
    for k in order:  # data in another order than the blocks, with 3-value gaps
        data_off[k] = pos
        pos += lengths[k] + 3
    half = (len(lengths) + 1) // 2
    msgs = [list(range(half)), list(range(half, len(lengths)))]
    sizes = [spec.message_nbytes([lengths[k] for k in m]) for m in msgs]
    M = max(sizes) + 5
    rows = []
    for r, blocks in enumerate(msgs):
        code = spec.scale_nbytes * len(blocks)
        for i, k in enumerate(blocks):
            rows.append((data_off[k], data_off[k] + 1, lengths[k], r * M, i * spec.scale_nbytes,
                         code, 100 + k))
            code += spec.code_nbytes(lengths[k])
    return table_from_rows(rows), pos + 1, 2 * M


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN == NaN (NaN payloads differ between CPUs and GPUs)."""
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan]))


def _run_encode(spec, x, table, nbytes, res, scale, key, impl, device="cpu"):
    msg = torch.full((nbytes,), 0xAB, dtype=torch.uint8, device=device)  # poison: gaps stay
    r = res.clone().to(device)
    bad = torch.full((table.shape[0],), -1, dtype=torch.int32, device=device)
    blockq.encode(spec, x.to(device), table.to(device), msg, r, scale, key, bad, impl=impl)
    return msg.cpu(), r.cpu(), bad.cpu()


@pytest.mark.parametrize("scale", [1.0, 0.75, 1024.0])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("impl", FAST)
def test_encode_matches_reference(impl, name, scale):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(hash(name) % 1000)
    B = spec.block
    lengths = [B, 1, 7, 8, B - 1, 13, B, 40, 3, B]
    table, n, nbytes = _scattered_table(spec, lengths, g)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)[torch.randperm(n, generator=g)]
    x[torch.randint(0, n, (n // 20,), generator=g)] = 0.0
    x[table[1, 0]] = math.inf  # block 1 is non-finite
    x[table[8, 0] + 2] = math.nan  # so is block 8
    res = torch.randn(n, generator=g) * 0.01
    key = 0x5DEECE66D ^ hash(name) % 10000
    ref = _run_encode(spec, x, table, nbytes, res, scale, key, "reference")
    got = _run_encode(spec, x, table, nbytes, res, scale, key, impl)
    assert torch.equal(got[0], ref[0]), "message bytes differ"
    assert torch.equal(got[2], ref[2]) and ref[2].tolist().count(1) == 2, "non-finite flags"
    assert _equal(got[1], ref[1]), "residuals differ"
    # the residual of a non-finite block is untouched, the gaps between blocks too
    assert torch.equal(ref[1][table[1, 1]:table[1, 1] + 1], res[table[1, 1]:table[1, 1] + 1])
    gaps = torch.ones(n, dtype=torch.bool)
    for d, r_, ln in table[:, :3].tolist():
        gaps[r_:r_ + ln] = False
    assert torch.equal(ref[1][gaps], res[gaps])
    covered = torch.zeros(nbytes, dtype=torch.bool)
    for row in table.tolist():
        covered[row[3] + row[4]:row[3] + row[4] + spec.scale_nbytes] = True
        covered[row[3] + row[5]:row[3] + row[5] + spec.code_nbytes(row[2])] = True
    assert torch.all(ref[0][~covered] == 0xAB), "bytes outside the blocks were written"


@pytest.mark.parametrize("mode", ["copy", "mean", "vote"])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("impl", FAST)
def test_decode_matches_reference(impl, name, mode):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(7 + hash(name) % 1000)
    lengths = [spec.block, 5, 24, spec.block - 3]
    table, n, nbytes = _scattered_table(spec, lengths, g)
    npeers = 1 if mode == "copy" else 3
    msgs = []
    for p in range(npeers):
        x = torch.randn(n, generator=g)
        if p == 1:
            x[table[2, 0]] = math.nan
        msgs.append(_run_encode(spec, x, table, nbytes, torch.zeros(n), 1.0, p, "reference")[0])
    M = nbytes // 2  # each peer sends two messages of M bytes; the last byte is free
    flag_off = M - 1 if mode == "vote" else -1
    if mode == "vote":
        msgs[2][M - 1] = msgs[2][2 * M - 1] = 1  # peer 2 flags its messages: NaN everywhere
    wire = torch.cat(msgs)
    outs = {}
    for which in ("reference", impl):
        out = torch.full((n,), 7.5)  # poison: the gaps keep it
        blockq.decode(spec, wire, table, out, npeers=npeers, peer_stride=nbytes,
                      flag_off=flag_off, mode=mode, impl=which)
        outs[which] = out
    assert _equal(outs[impl], outs["reference"])
    assert (outs["reference"] == 7.5).sum() == n - sum(lengths)
    if mode == "vote":
        assert torch.isnan(outs["reference"][table[0, 0]:table[0, 0] + lengths[0]]).all()



def _aligned_table(spec: BlockSpec, lengths: list[int], gen: torch.Generator, odd: int = 5):
    """Blocks whose data offsets, lengths and code offsets are multiples of 4 (what the word
    decode kernel takes), shuffled, plus one block of ``odd`` values at odd offsets (which must
    go to the byte kernel). Returns (table, data size, message bytes, which rows are aligned)."""
    lengths = lengths + [odd]
    order = torch.randperm(len(lengths), generator=gen).tolist()
    data_off, pos = {}, 0
    for k in order:
        data_off[k] = pos + (1 if k == len(lengths) - 1 else 0)
        pos += -(-(lengths[k] + 1) // 4) * 4 + 4
    code = -(-spec.scale_nbytes * len(lengths) // 4) * 4
    rows, aligned = [], []
    for k, ln in enumerate(lengths):
        last = k == len(lengths) - 1
        code += 1 if last else 0  # the odd block's codes start off a word boundary
        rows.append((data_off[k], data_off[k], ln, 0, k * spec.scale_nbytes, code, 100 + k))
        aligned.append(not last and (spec.scale != "fp32" or k * spec.scale_nbytes % 4 == 0))
        code = -(-(code + spec.code_nbytes(ln)) // 4) * 4
    return table_from_rows(rows), pos, code, torch.tensor(aligned)


WORD_SPECS = [k for k, v in SPECS.items() if v.code_bits in (1, 2, 4, 8)]


@pytest.mark.parametrize("mode", ["copy", "mean", "vote"])
@pytest.mark.parametrize("name", WORD_SPECS)
def test_word_decode_kernel_matches_reference(name, mode, monkeypatch):
    """The word kernel (aligned rows: 32-bit code words, 16-byte stores) and the byte kernel
    (the rest of the table) together give the reference's values, bit for bit."""
    if "triton" not in FAST:
        pytest.skip("triton is not installed")
    from dqt.kernels.blockq import triton_impl

    monkeypatch.setattr(triton_impl, "WORDS_MIN_BLOCK", 0)  # small blocks: the word kernel too

    spec = SPECS[name]
    g = torch.Generator().manual_seed(31 + hash(name) % 1000)
    B = spec.block
    table, n, M, aligned = _aligned_table(spec, [B, 4, 24, B - 8, 12, B], g)
    npeers = 1 if mode == "copy" else 4
    msgs = []
    for p in range(npeers):
        x = torch.randn(n, generator=g) * (p + 1)
        x[table[1, 0]] = math.nan if p == 2 else x[table[1, 0]]
        msgs.append(_run_encode(spec, x, table, M + 4, torch.zeros(n), 1.0, p, "reference")[0])
    flag_off = M if mode == "vote" else -1
    if mode == "vote":
        msgs[3][M] = 1  # peer 3 flags its message: NaN everywhere
    wire = torch.cat(msgs)
    assert triton_impl.decode_path(spec, wire, M + 4) == "words"
    assert torch.equal(triton_impl.word_rows(spec, table), aligned) and aligned.sum() >= 5
    outs = {}
    for which in ("reference", "triton"):
        out = torch.full((n,), 7.5)
        blockq.decode(spec, wire, table, out, npeers=npeers, peer_stride=M + 4,
                      flag_off=flag_off, mode=mode, impl=which)
        outs[which] = out
    assert _equal(outs["triton"], outs["reference"])
    assert (outs["reference"] == 7.5).sum() == n - int(table[:, 2].sum())
    if mode != "vote":
        assert torch.isfinite(outs["reference"]).sum() > n // 2



@pytest.mark.parametrize("trits", [True, False], ids=["trit-major", "lane-per-trit"])
@pytest.mark.parametrize("mode", ["mean", "vote"])
def test_both_base3_decode_kernels_match_reference(trits, mode, monkeypatch):
    """Base-3 decode: the trit-major kernel (the default) and the lane-per-trit kernel it
    replaced (DQT_DECODE_TRITS=0, kept for the GPU A/B) give the reference's values."""
    if "triton" not in FAST:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("DQT_DECODE_TRITS", "1" if trits else "0")
    spec = BlockSpec("ternary", 2048, 0, "fp32")
    g = torch.Generator().manual_seed(5)
    table, n, nbytes = _scattered_table(spec, [2048, 5, 24, 2045, 641], g)
    msgs = [_run_encode(spec, torch.randn(n, generator=g), table, nbytes, torch.zeros(n), 1.0,
                        p, "reference")[0] for p in range(3)]
    M = nbytes // 2
    flag_off = M - 1 if mode == "vote" else -1
    if mode == "vote":
        msgs[1][M - 1] = 1  # peer 1 flags its first message
    wire = torch.cat(msgs)
    outs = {}
    for which in ("reference", "triton"):
        out = torch.full((n,), 7.5)
        blockq.decode(spec, wire, table, out, npeers=3, peer_stride=nbytes, flag_off=flag_off,
                      mode=mode, impl=which)
        outs[which] = out
    assert _equal(outs["triton"], outs["reference"])
    assert (outs["reference"] == 7.5).sum() == n - int(table[:, 2].sum())


def test_trit_table_is_the_reference_unpack():
    """Entry b of the lookup table = the five codes (b // 3^m) mod 3 as 2-bit fields, for all
    256 bytes (the 13 above 242, which no encoder writes, included)."""
    pytest.importorskip("triton")
    from dqt.kernels.blockq import triton_impl

    t = triton_impl.trit_table(torch.device("cpu"))
    assert t.dtype == torch.int32 and t.shape == (256,)
    for b in range(256):
        assert t[b].item() == sum(((b // 3 ** m) % 3) << (2 * m) for m in range(5)), b

def test_word_rows_follow_the_table():
    """The aligned-row mask is cached per table and recomputed when the table changes."""
    if "triton" not in FAST:
        pytest.skip("triton is not installed")
    from dqt.kernels.blockq import triton_impl

    spec = SPECS["ternary/2bit"]
    table, _ = blockq.linear_table(spec, 3 * 64 + 8)
    assert triton_impl.word_rows(spec, table).tolist() == [True] * 4
    table[1, 0] += 2  # block 1 now starts off a 16-byte boundary
    assert triton_impl.word_rows(spec, table).tolist() == [True, False, True, True]
    msg = torch.zeros(12, dtype=torch.uint8)
    big = BlockSpec("ternary", 2048, 2, "fp32")
    assert triton_impl.decode_path(big, msg, 4) == "words"
    assert triton_impl.decode_path(big, msg[:10], 4) == "bytes"  # 10 bytes: not whole words
    assert triton_impl.decode_path(big, msg, 6) == "bytes"  # peers 6 bytes apart
    assert triton_impl.decode_path(BlockSpec("ternary", 2048, 0, "fp32"), msg, 4) == "bytes"
    qsgd3 = BlockSpec("qsgd", 2048, 3, "fp32", levels=3)
    assert triton_impl.decode_path(qsgd3, msg, 4) == "bytes"
    # onebit's 128-value blocks keep the byte kernel (measured at 85-90 % of clone on an H100)
    assert triton_impl.decode_path(BlockSpec("sign_mean", 128, 1, "e8m0"), msg, 4) == "bytes"


def test_word_rows_cache_lives_outside_the_table():
    """The per-table cache puts nothing on the tensor, and its entry goes with the table."""
    pytest.importorskip("triton")
    import gc

    from dqt.kernels.blockq import triton_impl

    spec = SPECS["ternary/2bit"]
    table, _ = blockq.linear_table(spec, 3 * 64 + 8)
    before = len(triton_impl._SPLITS._entries)
    rows = triton_impl.word_rows(spec, table)
    assert vars(table) == {} and len(triton_impl._SPLITS._entries) == before + 1
    assert triton_impl.word_rows(spec, table) is rows
    assert triton_impl.word_rows(SPECS["qsgd/4"], table) is not rows  # other spec: recomputed
    del table, rows
    gc.collect()
    assert len(triton_impl._SPLITS._entries) == before


def test_decode_switches_are_read_at_each_call(monkeypatch):
    pytest.importorskip("triton")
    from dqt.kernels.blockq import triton_impl

    big, msg = BlockSpec("ternary", 2048, 2, "fp32"), torch.zeros(12, dtype=torch.uint8)
    monkeypatch.delenv("DQT_DECODE_WORDS", raising=False)
    monkeypatch.delenv("DQT_DECODE_TRITS", raising=False)
    assert triton_impl.decode_path(big, msg, 4) == "words" and triton_impl.decode_trits_enabled()
    monkeypatch.setenv("DQT_DECODE_WORDS", "0")
    monkeypatch.setenv("DQT_DECODE_TRITS", "0")
    assert triton_impl.decode_path(big, msg, 4) == "bytes"
    assert not triton_impl.decode_trits_enabled()

def test_decode_sums_in_peer_order_then_averages():
    """mean of N peers = (d₀ + d₁ + …)/N in fp32, exactly: checked against the formula."""
    spec = BlockSpec("sign_mean", 16, 1, "fp32")
    table, _ = blockq.linear_table(spec, 16)
    xs = [torch.full((16,), v) for v in (1e8, 1.0, -1e8)]
    msgs = []
    for x in xs:
        m = torch.zeros(spec.message_nbytes([16]), dtype=torch.uint8)
        blockq.encode(spec, x, table, m, impl="reference")
        msgs.append(m)
    for impl in available_impls("cpu"):
        out = torch.empty(16)
        blockq.decode(spec, torch.cat(msgs), table, out, npeers=3, peer_stride=msgs[0].numel(),
                      mode="mean", impl=impl)
        expected = ((torch.tensor(1e8) + 1.0) + -1e8) / 3  # fp32: 1e8 + 1 rounds to 1e8
        assert torch.equal(out, torch.full((16,), float(expected))), impl


# sign_two: blocks of 8 — known group means; all ≥ 0 (−0.0 among them: it codes 1); all < 0;
# a non-finite block
TWO = [1.0, -2.0, 3.0, -4.0, 0.0, 5.0, -6.0, 7.0,  # m₀ = 12/3 = 4, m₁ = 16/5 = fp32(3.2)
       0.5, 1.5, -0.0, 2.0, 0.25, 0.75, 1.0, 2.0,  # no value < 0: m₀ = 0, m₁ = 8/8 = 1
       -1.0, -3.0, -0.5, -0.5, -2.0, -1.0, -3.0, -1.0,  # no value ≥ 0: m₀ = 12/8 = 1.5, m₁ = 0
       1.0, float("nan"), -1.0, 2.0, -2.0, 3.0, -3.0, 4.0]  # non-finite
TWO_MEANS = [(4.0, 3.2), (0.0, 1.0), (1.5, 0.0)]


@pytest.mark.parametrize("impl", available_impls("cpu"))
def test_sign_two_decodes_to_the_two_group_means(impl):
    """sign_two with fp32 scales: the scale field is (m₀, m₁), the mean magnitudes of the
    values < 0 and ≥ 0 (0 for an empty group); code [v ≥ 0]; decode +m₁ / −m₀; the residual
    becomes v − decode; a non-finite block sends NaN scales and zero codes, keeps its residual."""
    spec = BlockSpec("sign_two", 8, 1, "fp32")
    assert (spec.scales_per_block, spec.scale_nbytes) == (2, 8)
    x = torch.tensor(TWO)
    table, nbytes = blockq.linear_table(spec, x.numel())
    assert nbytes == spec.message_nbytes([8] * 4) == 4 * 8 + 4
    msg = torch.zeros(nbytes, dtype=torch.uint8)
    e0 = torch.full((32,), 0.25)
    res, bad = e0.clone(), torch.zeros(4, dtype=torch.int32)
    blockq.encode(spec, x - e0, table, msg, res, bad=bad, impl=impl)  # v = x − e0 + e0 = x
    scales = msg[:32].view(torch.float32).view(4, 2)
    f32 = lambda a: float(torch.tensor(a, dtype=torch.float32))  # noqa: E731
    assert scales[:3].tolist() == [[f32(a0), f32(a1)] for a0, a1 in TWO_MEANS]
    assert torch.isnan(scales[3]).all() and bad.tolist() == [0, 0, 0, 1]
    assert msg[32:].tolist() == [0b10110101, 0xFF, 0x00, 0x00]  # [v ≥ 0], bit j = value j
    out = torch.empty(32)
    blockq.decode(spec, msg, table, out, impl=impl)
    want = [(f32(m1) if v >= 0 else -f32(m0)) for k, (m0, m1) in enumerate(TWO_MEANS)
            for v in TWO[8 * k:8 * k + 8]]
    assert out[:24].tolist() == want and torch.isnan(out[24:]).all()
    # error feedback: v − decode with the transmitted scales; the non-finite block keeps e0
    assert torch.equal(res[:24], (x - e0 + e0)[:24] - out[:24])
    assert torch.equal(res[24:], e0[24:])


@pytest.mark.parametrize("impl", available_impls("cpu"))
def test_sign_two_scales_are_rounded_magnitudes(impl):
    """bf16 and e8m0 carry m₀ and m₁ as magnitudes rounded like any scale; e8m0 (unsigned)
    decodes code 0 to −m₀. Block 0: m₀ = 4 → e8m0 2² (129), m₁ = 3.2 = 1.6·2¹ → 2² (129)."""
    from dqt.kernels.blockq import _e8m0_code

    x = torch.tensor(TWO[:24])
    for scale, nb in (("bf16", 2), ("e8m0", 1)):
        spec = BlockSpec("sign_two", 8, 1, scale)
        table, nbytes = blockq.linear_table(spec, 24)
        msg = torch.zeros(nbytes, dtype=torch.uint8)
        blockq.encode(spec, x, table, msg, impl=impl)
        means = torch.tensor(TWO_MEANS).view(-1)
        if scale == "bf16":
            sent = means.to(torch.bfloat16).float()
            assert torch.equal(msg[:12].view(torch.bfloat16).float(), sent)
        else:
            assert msg[:6].tolist() == _e8m0_code(means).tolist() == [129, 129, 0, 127, 128, 0]
            sent = torch.tensor([4.0, 4.0, 0.0, 1.0, 2.0, 0.0])  # 1.5 ≥ √2: rounds up to 2
        out = torch.empty(24)
        blockq.decode(spec, msg, table, out, impl=impl)
        m0, m1 = (sent.view(3, 2)[:, c].repeat_interleave(8) for c in (0, 1))
        assert torch.equal(out, torch.where(x >= 0, m1, -m0)), scale


def test_sign_two_spec():
    assert BlockSpec("sign_two", 64, 1, "bf16").scale_nbytes == 4
    assert BlockSpec("sign_two", 64, 1, "e8m0").message_nbytes([64, 10]) == 2 * 2 + 8 + 2
    assert BlockSpec("sign_mean", 64, 1, "e8m0").scale_nbytes == 1
    with pytest.raises(ValueError, match="only it has scale 'none'"):
        BlockSpec("sign_two", 64, 1, "none")
    with pytest.raises(ValueError, match="sign_two"):
        BlockSpec("sign_two", 64, 0, "fp32")


def test_stochastic_rounding_depends_on_key_and_counter():
    spec = SPECS["ternary/2bit"]
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    rows = lambda ctr: table_from_rows([(0, 0, 64, 0, 0, 4, ctr)])  # noqa: E731
    enc = {}
    for key, ctr in [(1, 0), (1, 0), (2, 0), (1, 1)]:
        m = torch.zeros(20, dtype=torch.uint8)
        blockq.encode(spec, x, rows(ctr), m, key=key)
        enc.setdefault((key, ctr), []).append(m)
    assert torch.equal(*enc[(1, 0)])
    assert not torch.equal(enc[(1, 0)][0], enc[(2, 0)][0])
    assert not torch.equal(enc[(1, 0)][0], enc[(1, 1)][0])


def test_bad_arguments():
    spec = SPECS["onebit/bf16"]
    table, nbytes = blockq.linear_table(spec, 10)
    msg = torch.zeros(nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fp32"):
        blockq.encode(spec, torch.zeros(10, dtype=torch.float16), table, msg)
    with pytest.raises(ValueError, match="table must be int64"):
        blockq.encode(spec, torch.zeros(10), table[:, :7].contiguous(), msg)
    with pytest.raises(ValueError, match="mode"):
        blockq.decode(spec, msg, table, torch.zeros(10), mode="median")
    with pytest.raises(ValueError, match="impl"):
        blockq.encode(spec, torch.zeros(10), table, msg, impl="cuda")
    with pytest.raises(ValueError, match="block must be a positive multiple of 8"):
        BlockSpec("sign_mean", 12, 1, "bf16")
    with pytest.raises(ValueError, match="levels"):
        BlockSpec("qsgd", 64, 2, "fp32", levels=3)


def test_import_touches_no_device_and_needs_no_triton():
    """``import dqt.kernels.blockq`` works without CUDA and without triton: checked in a child
    process where importing triton fails and CUDA is hidden."""
    import subprocess
    import sys

    code = ("import sys, builtins; real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name.split('.')[0] == 'triton': raise ImportError('no triton')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "import torch, dqt, dqt.comm, dqt.kernels.blockq as b\n"
            "from dqt.kernels.blockq import triton_impl as t\n"
            "assert not t.available() and not t.interpreting()\n"
            "assert 'triton' not in b.available_impls('cpu')\n"
            "print('ok')\n")
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(SPECS))
def test_triton_on_gpu_matches_reference(name):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(11)
    lengths = [spec.block, 1, 7, spec.block - 1, 40]
    table, n, nbytes = _scattered_table(spec, lengths, g)
    x = torch.randn(n, generator=g)
    x[table[1, 0]] = math.inf
    res = torch.randn(n, generator=g) * 0.01
    ref = _run_encode(spec, x, table, nbytes, res, 2.0, 99, "reference")
    got = _run_encode(spec, x, table, nbytes, res, 2.0, 99, "triton", device="cuda")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]) and _equal(got[1], ref[1])
    out_ref, out_gpu = torch.zeros(n), torch.zeros(n, device="cuda")
    blockq.decode(spec, ref[0], table, out_ref, impl="reference")
    blockq.decode(spec, ref[0].cuda(), table.cuda(), out_gpu, impl="triton")
    assert _equal(out_gpu.cpu(), out_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", WORD_SPECS)
def test_word_decode_on_gpu_matches_reference(name, monkeypatch):
    from dqt.kernels.blockq import triton_impl

    monkeypatch.setattr(triton_impl, "WORDS_MIN_BLOCK", 0)
    spec = SPECS[name]
    g = torch.Generator().manual_seed(13)
    table, n, M, _ = _aligned_table(spec, [spec.block, 4, spec.block - 8, 12], g)
    msgs = [_run_encode(spec, torch.randn(n, generator=g), table, M, torch.zeros(n), 1.0, p,
                        "reference")[0] for p in range(3)]
    wire = torch.cat(msgs)
    assert triton_impl.decode_path(spec, wire, M) == "words"
    out_ref, out_gpu = torch.zeros(n), torch.zeros(n, device="cuda")
    blockq.decode(spec, wire, table, out_ref, npeers=3, peer_stride=M, mode="mean",
                  impl="reference")
    blockq.decode(spec, wire.cuda(), table.cuda(), out_gpu, npeers=3, peer_stride=M, mode="mean",
                  impl="triton")
    assert _equal(out_gpu.cpu(), out_ref)


@pytest.fixture(scope="module")
def sass_profile() -> dict[tuple[str, str], dict]:
    """``benchmarks/sass_decode.py``'s table — every decode kernel compiled for sm_90 (H100)
    without a GPU, with the ptxas/nvdisasm that ship with triton — as (scheme, kernel) →
    {"per_thread": values per thread, "per_value": SASS per value, "mem": {op: count}}."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    out = subprocess.run([sys.executable, "-m", "benchmarks.sass_decode"], capture_output=True,
                         text=True, env=env, cwd=root, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines()[2:]:
        scheme, kernel, _, per_thread, _, per_value, mem = (c.strip() for c in line.split("|")[1:8])
        rows[(scheme, kernel)] = {"per_thread": int(per_thread), "per_value": float(per_value),
                                  "mem": {k: int(v) for k, v in (m.rsplit(" ", 1)
                                                                 for m in mem.split(", "))}}
    return rows


def test_word_decode_compiles_to_16_byte_stores(sass_profile):
    """The word kernel writes its fp32 results with 16-byte stores (STG.E.128) and loads whole
    code words, where the byte kernel stores 4 bytes at a time and loads bytes: the property
    the kernel exists for (ternary 2-bit, 16 values per thread, 4 peers)."""
    words = sass_profile[("ternary_grad (2bit)", "words")]["mem"]
    byte = sass_profile[("ternary_grad (2bit)", "bytes")]["mem"]
    assert words.get("STG.E.128") == 4 and "STG.E" not in words, words
    assert "LDG.E.U8" not in words and words["LDG.E"] == 8, words  # 2 words x 4 peers
    assert byte.get("STG.E") == 16 and byte.get("LDG.E.U8", 0) > 0, byte
    for scheme in ("ef_signsgd", "signsgd", "qsgd bits=8"):  # and no shared-memory round trip
        mem = sass_profile[(scheme, "words")]["mem"]
        assert not [k for k in mem if k.startswith(("LDS", "STS"))], (scheme, mem)


def test_trit_major_decode_compiles_without_idle_lanes(sass_profile):
    """The base-3 trit-major kernel keeps each thread on whole bytes (20 values from 4 bytes
    per peer, one table lookup per byte), with no shared-memory round trip, and needs fewer
    instructions per value than the lane-per-trit kernel."""
    trits = sass_profile[("ternary_grad (base3)", "trits")]
    old = sass_profile[("ternary_grad (base3)", "bytes")]
    assert trits["per_thread"] == 20  # values per thread: 4 bytes x 5 trits
    assert not [k for k in trits["mem"] if k.startswith(("LDS", "STS"))], trits["mem"]
    assert trits["mem"]["LDG.E"] == 16  # the table lookups: 4 bytes x 4 peers
    assert trits["per_value"] < 0.7 * old["per_value"], (trits, old)
