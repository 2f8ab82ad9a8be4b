"""Export a trained QAT run as packed integer weights (safetensors + JSON), then check it.

    python launch/export.py RUN_DIR [--out DIR]       # newest checkpoint of the run
    python launch/export.py RUN_DIR/checkpoints/step_0000300
    python launch/export.py RUN_DIR --format onnx     # DIR/model.onnx with QDQ nodes

Writes DIR/model.safetensors and DIR/model.json (DIR defaults to RUN_DIR/export), prints the
size summary, reloads the export and compares its outputs with the fake-quant model's on a
random batch. ``--format onnx`` writes DIR/model.onnx instead, runs it with onnxruntime and
prints the largest output difference from the fake-quant model in 8-bit steps of the output
range (exit 1 above one step); a layer ONNX cannot express stops it before anything is written.
"""

import argparse
import os
import sys

import torch

from dqt.quant.export.summary import format_summary, summarize
from dqt.train.export import export_run, find_checkpoint, load_export, load_trained


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", help="run directory or checkpoint directory")
    ap.add_argument("--out", help="output directory (default: RUN_DIR/export)")
    ap.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                    help="safetensors: packed codes + JSON (default); onnx: a QDQ ONNX model")
    args = ap.parse_args(argv)
    try:
        _, run_dir = find_checkpoint(args.run)
    except FileNotFoundError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(run_dir, "export")
    if args.format == "onnx":
        return export_onnx_run(args.run, out)
    model, path = export_run(args.run, out)
    print(format_summary(summarize(model)))
    print(f"wrote {os.path.join(out, 'model.safetensors')} and {path}")
    loaded = load_export(out)
    x = random_batch(__import__("json").load(open(path))["data_meta"])
    with torch.no_grad():
        diff = (model(x) - loaded(x)).abs().max().item()
    print(f"reloaded export vs fake-quant model on a random batch: max |diff| = {diff:.3g}")
    return 0 if diff == 0 else 1


def random_batch(meta: dict) -> torch.Tensor:
    """A fixed random batch of the run's input (tokens for language models)."""
    torch.manual_seed(0)
    if meta["task"] in ("lm", "tokens"):
        return torch.randint(0, meta["num_classes"], (4, *meta["input_shape"]))
    return torch.randn(16, *meta["input_shape"])


def export_onnx_run(run: str, out: str) -> int:
    from dqt.errors import ConfigError
    from dqt.quant.export.onnx import export_onnx, output_step, run_onnx

    model, info = load_trained(run)
    x = random_batch(info["data_meta"])
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.onnx")
    try:
        written = export_onnx(model, x[:2], path)
    except ConfigError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    for name, how in written["layers"].items():
        print(f"  {name}: {how}")
    print(f"wrote {path} ({written['bytes']:,} bytes)")
    with torch.no_grad():
        ref = model(x)
    diff = (run_onnx(path, x) - ref).abs().max().item()
    steps = diff / output_step(ref)
    print(f"onnxruntime vs fake-quant model on a random batch: max |diff| = {diff:.3g} "
          f"({steps:.3g} output steps)")
    return 0 if steps <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
