"""Latency and file size of the ONNX export (``dqt.quant.export.onnx``) on CPU: fp32 PyTorch,
fp32 onnxruntime and the QDQ model in onnxruntime, for the MLP and the CNN (``data=digits``
shapes, the repository's default widths) and the char GPT (``experiment=shakespeare_char``:
4 layers, 4 heads, 128 wide, context 64, vocab 65).

    python -m benchmarks.bench_onnx                      # batch 1 and 64, median of 50 runs
    python -m benchmarks.bench_onnx --runs 20 --threads 2 --models gpt

The quantized models are ``qat=w8a8`` (int8 per-channel weights, uint8 static activations;
first and last layer fp32, as the preset) and ``qat=int8dyn_int4w`` (int4 weights per group of
32, uint8 per-token activations; MLP and GPT: the preset quantizes Linear layers only), attached
to the same fp32 weights and calibrated with 5 random batches (latency does not depend on
training). Every model runs on the same inputs. Prints a markdown table (median latency in ms
per batch, file size) and, per quantized model, the largest difference between onnxruntime and
the fake-quant PyTorch model in 8-bit steps of the output range.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import tempfile
import time

import torch

from dqt.quant import preset, qat_step, quantize_
from dqt.quant.export.onnx import export_onnx, output_step, run_onnx, session
from dqt.train.models import GPT, MLP, LeNetCNN

PRESETS = {"int8 QDQ (w8a8)": "w8a8",
           "int4 weights + int8 per token (int8dyn_int4w)": "int8dyn_int4w"}  # conf/qat/


def models() -> dict[str, tuple[torch.nn.Module, callable, list[str]]]:
    torch.manual_seed(0)
    return {
        "mlp": (MLP(64, [256, 256], 10), lambda b: torch.randn(b, 1, 8, 8), list(PRESETS)),
        "cnn": (LeNetCNN((1, 8, 8), [32, 64], 128, 10), lambda b: torch.randn(b, 1, 8, 8),
                ["int8 QDQ (w8a8)"]),
        "gpt": (GPT(65, 64, 4, 4, 128), lambda b: torch.randint(0, 65, (b, 64)), list(PRESETS)),
    }


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def state_bytes(model: torch.nn.Module) -> int:
    f = io.BytesIO()
    torch.save(model.state_dict(), f)
    return len(f.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "gpt"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench_onnx_")
    rows, diffs = [], []
    for name, (fp32, batch, presets) in models().items():
        if name not in args.models:
            continue
        fp32.eval()
        torch.manual_seed(1)
        inputs = {b: batch(b) for b in args.batches}
        variants = [("fp32 PyTorch", fp32, None)]
        path = os.path.join(tmp, f"{name}_fp32.onnx")
        export_onnx(fp32, batch(2), path)
        variants.append(("fp32 onnxruntime", None, path))
        for label in presets:
            q = copy.deepcopy(fp32).train()
            quantize_(q, preset(PRESETS[label]))
            torch.manual_seed(2)
            for _ in range(5):  # calibrate the static activation ranges
                q(batch(16))
                qat_step(q)
            q.eval()
            path = os.path.join(tmp, f"{name}_{q.__class__.__name__}_{len(variants)}.onnx")
            export_onnx(q, batch(2), path)
            variants.append((f"{label} onnxruntime", None, path))
            x = inputs[max(args.batches)]
            with torch.no_grad():
                ref = q(x)
            diffs.append((name, label, (run_onnx(path, x) - ref).abs().max().item()
                          / output_step(ref)))
        for label, model, path in variants:
            lat = []
            if path is None:
                size = state_bytes(model)
                for b in args.batches:
                    with torch.no_grad():
                        lat.append(median_ms(lambda: model(inputs[b]), args.runs))
            else:
                size = os.path.getsize(path)
                s = session(path, threads=args.threads)
                for b in args.batches:
                    feed = {"input": inputs[b].numpy()}
                    lat.append(median_ms(lambda: s.run(None, feed), args.runs))
            rows.append((name, label, lat, size))
    head = " | ".join(f"batch {b} (ms)" for b in args.batches)
    print(f"median of {args.runs} runs, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}\n")
    print(f"| model | runtime | {head} | file (bytes) |")
    print("|---|---|" + "---|" * len(args.batches) + "---|")
    for name, label, lat, size in rows:
        cells = " | ".join(f"{v:.3f}" for v in lat)
        print(f"| {name} | {label} | {cells} | {size:,} |")
    print("\nonnxruntime vs the fake-quant PyTorch model, batch "
          f"{max(args.batches)}: max |diff| in 8-bit steps of the output range")
    for name, label, steps in diffs:
        print(f"- {name} {label}: {steps:.3g}")


if __name__ == "__main__":
    main()
