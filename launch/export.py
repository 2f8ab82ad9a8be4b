"""Export a trained QAT run as packed integer weights (safetensors + JSON), then check it.

    python launch/export.py RUN_DIR [--out DIR]       # newest checkpoint of the run
    python launch/export.py RUN_DIR/checkpoints/step_0000300

Writes DIR/model.safetensors and DIR/model.json (DIR defaults to RUN_DIR/export), prints the
size summary, reloads the export and compares its outputs with the fake-quant model's on a
random batch.
"""

import argparse
import os
import sys

import torch

from dqt.quant.export.summary import format_summary, summarize
from dqt.train.export import export_run, find_checkpoint, load_export


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", help="run directory or checkpoint directory")
    ap.add_argument("--out", help="output directory (default: RUN_DIR/export)")
    args = ap.parse_args(argv)
    try:
        _, run_dir = find_checkpoint(args.run)
    except FileNotFoundError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(run_dir, "export")
    model, path = export_run(args.run, out)
    print(format_summary(summarize(model)))
    print(f"wrote {os.path.join(out, 'model.safetensors')} and {path}")
    loaded = load_export(out)
    meta = __import__("json").load(open(path))["data_meta"]
    torch.manual_seed(0)
    if meta["task"] == "lm":
        x = torch.randint(0, meta["num_classes"], (4, *meta["input_shape"]))
    else:
        x = torch.randn(16, *meta["input_shape"])
    with torch.no_grad():
        diff = (model(x) - loaded(x)).abs().max().item()
    print(f"reloaded export vs fake-quant model on a random batch: max |diff| = {diff:.3g}")
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
