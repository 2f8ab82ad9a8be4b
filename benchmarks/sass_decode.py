"""Static SASS profile of the Triton decode kernels, without a GPU.

Compiles the byte and the word decode kernels of every benchmarked scheme ahead of time for
sm_90 (H100) with the ptxas/nvdisasm that ship with triton, with the launch parameters that
``dqt.kernels.blockq.triton_impl.decode`` uses on ``bench_kernels.py``'s 16M-value tables (4
peers, mean), and prints per kernel: lanes (values) per thread, SASS instructions per thread
and per output value of the block (lanes that hold no value — base-3 padding — count against
the others; straight-line code: no loops at these sizes, so static = dynamic), global
loads/stores by width, and shared-memory traffic (layout conversions). A proxy for issue cost
only — GPU time comes from ``bench_kernels.py --gpu``.

    python -m benchmarks.sass_decode            (TRITON_INTERPRET must be unset)
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dqt.comm.compressors import build_compressor
from dqt.kernels.blockq import triton_decode as td
from dqt.kernels.blockq import triton_impl as bt
from dqt.kernels.blockq.format import CODES, SCALES

from benchmarks.bench_kernels import VARIANTS

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIG = {"tab_ptr": "*i64", "out_ptr": "*fp32", "nblocks": "i32", "stride": "i64",
       "flag_off": "i32", "inv_n": "fp32"}


def compile_sass(fn, sig: dict, const: dict, warps: int) -> str:
    """SASS of ``fn`` for sm_90; pointers and (nblocks, stride) specialised as 16-divisible,
    as the launcher does for these arguments on the benchmark's tensors."""
    s = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in sig and (sig[a].startswith("*") or a in ("nblocks", "stride"))}
    src = ASTSource(fn, s, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "enable_fp_fusion": False})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], check=True,
                              capture_output=True, text=True).stdout


def profile(text: str) -> tuple[int, dict]:
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1)] += 1
    mem = {k: v for k, v in sorted(ops.items()) if k.startswith(("LDG", "STG", "LDS", "STS"))}
    return sum(ops.values()), mem


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    n = 16 << 20
    print("| scheme | kernel | warps | values/thread | SASS/thread | SASS/value | memory ops |")
    print("|---|---|---|---|---|---|---|")
    for label, (name, opts) in VARIANTS.items():
        spec = build_compressor(name, **opts).spec
        lanes = bt._lanes(spec)
        const = dict(NPEERS=4, KIND=CODES["kind"][spec.kind], CODE_BITS=spec.code_bits,
                     SCALE_FMT=CODES["scale"][spec.scale], SCALE_BYTES=SCALES[spec.scale],
                     LEVELS=spec.levels, LANES=lanes,
                     MODE=CODES["mode"]["mean"], HAS_FLAG=False)
        nblocks = n // spec.block
        nb3 = triton.next_power_of_2(-(-spec.block // 5))
        per_block = 8 * nb3 if spec.code_bits == 0 else lanes  # lanes of a block, byte kernel
        bpp = max(1, min(bt.DECODE_TILE // per_block, triton.next_power_of_2(nblocks)))
        # (name, kernel, signature, constants, lanes per program, values per program, warps)
        kernels = [("bytes", td.decode_kernel, dict(SIG, msg_ptr="*u8"),
                    dict(const, NB3=nb3, BPP=bpp), bpp * per_block,
                    bpp * min(spec.block, per_block),
                    max(1, min(bt.DECODE_WARPS, bpp * per_block // 128)))]
        if spec.code_bits in (1, 2, 4, 8):
            wb = max(1, min(bt.WORDS_TILE // lanes, triton.next_power_of_2(nblocks)))
            kernels.append(("words", td.decode_words_kernel, dict(SIG, mw_ptr="*i32"),
                            dict(const, BPP=wb), wb * lanes, wb * lanes,
                            max(1, min(bt.WORDS_WARPS, wb * lanes // 128))))
        if spec.code_bits == 0:
            nb = -(-spec.block // 5)
            nbc = min(bt.TRITS_CHUNK, triton.next_power_of_2(nb))
            tb = max(1, min(bt.TRITS_TILE // nbc, triton.next_power_of_2(nblocks)))
            nchunk = -(-nb // nbc)
            tc = dict(NPEERS=4, SCALE_FMT=const["SCALE_FMT"], BPP=tb, NBC=nbc, NCHUNK=nchunk,
                      MODE=const["MODE"], HAS_FLAG=False)
            # with NCHUNK > 1 the chunk loop's body is counted once: then per chunk
            kernels.append(("trits", td.decode_trits_kernel,
                            dict(SIG, msg_ptr="*u8", lut_ptr="*i32"), tc, 5 * tb * nbc,
                            tb * min(spec.block, 5 * nbc), max(1, min(bt.DECODE_WARPS,
                                                                      tb * nbc // 128))))
        for kind, fn, sig, c, lanes_, values, warps in kernels:
            total, mem = profile(compile_sass(fn, sig, c, warps))
            threads = 32 * warps
            mems = ", ".join(f"{k} {v}" for k, v in mem.items())
            print(f"| {label} | {kind} | {warps} | {lanes_ // threads} | {total} | "
                  f"{total * threads / values:.1f} | {mems} |", flush=True)


if __name__ == "__main__":
    main()
