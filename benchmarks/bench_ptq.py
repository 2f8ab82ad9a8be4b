"""Post-training quantization: the fp32-trained model of ``benchmarks/bench_qat.py`` (its ``fp32``
runs, same seeds and run directories, trained first if missing) with a weight quantizer attached
and **no fine-tuning**, evaluated on the test split — ShiftCNN's setting (Gudovskiy & Rigazio
2017 convert a trained network without retraining), and Deep Compression's k-means before its
centroid fine-tuning for comparison.

    python -m benchmarks.bench_ptq --out /tmp/bench                # digits CNN + BN, seeds 1 2 3
    python -m benchmarks.bench_ptq --methods "ShiftCNN N2 B4" "ShiftCNN N1 B4"

Each method is a list of Hydra overrides of the ``qat`` group; the quantizers are attached to the
trained weights (``init_from`` sees them: k-means clusters them at attach, cluster_step=0).
Prints a markdown table: mean ± std test accuracy, the difference to the fp32 model itself
(``fp32`` row: the same evaluation without a quantizer, which must equal the run's own final
accuracy), per-seed values and the packed size.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

from benchmarks import bench_qat

METHODS = {
    "fp32": [],
    "ShiftCNN N2 B4": ["qat=shiftcnn"],
    "ShiftCNN N1 B4": ["qat=shiftcnn", "qat.default.weight.terms=1"],
    "ShiftCNN N2 B4 per channel": ["qat=shiftcnn", "qat.default.weight.per_channel=true"],
    "ShiftCNN N1 B2 ({0, ±max|W|})": ["qat=shiftcnn", "qat.default.weight.bits=2",
                                      "qat.default.weight.terms=1"],
    "ShiftCNN N2 B4, first and last layers too": ["qat=shiftcnn", "qat.keep_first_last=false"],
    "Deep Compression k-means W4, no fine-tuning": ["qat=kmeans", "qat.default.weight.cluster_step=0"],
    "Deep Compression k-means W2, no fine-tuning": ["qat=kmeans", "qat.default.weight.cluster_step=0",
                                                    "qat.default.weight.bits=2"],
    "Deep Compression k-means W1, no fine-tuning": ["qat=kmeans", "qat.default.weight.cluster_step=0",
                                                    "qat.default.weight.bits=1"],
    "pow2 W5 (INQ's levels, all at once)": ["qat=pow2"],
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dqt.config import register_configs, to_typed
    from dqt.train.run_dir import register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(bench_qat.ROOT, "conf"), version_base="1.3"):
        return to_typed(hydra_compose("train", overrides=overrides))


@torch.no_grad()
def accuracy(model: torch.nn.Module, split, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for idx in torch.arange(len(split)).split(batch):
        x, y = split.batch(idx)
        correct += int((model(x).argmax(-1) == y).sum())
    return correct / len(split)


def main() -> None:
    from dqt.quant import apply_qat
    from dqt.quant.export.summary import summarize
    from dqt.train.data import build_dataset
    from dqt.train.export import load_trained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--experiment", default="digits_cnn_bn")
    ap.add_argument("--out", default=os.path.join(bench_qat.ROOT, "outputs", "bench_qat"))
    args = ap.parse_args()
    base = [f"experiment={args.experiment}"]
    out_root = os.path.join(args.out, args.experiment)
    code = bench_qat.code_hash()
    trained = []
    for s in args.seeds:
        run = bench_qat.run("fp32", s, args.nproc, base, out_root, code)
        model, _ = load_trained(os.path.join(out_root, "fp32", f"seed{s}"))
        trained.append((model, run["eval/acc"]))
    data = build_dataset(compose(base).data)
    rows = {}
    for label in ["fp32", *[m for m in args.methods if m != "fp32"]]:
        cfg = compose([*base, *METHODS[label]])
        accs, size = [], None
        for model, run_acc in trained:
            m = apply_qat(cfg.qat, copy.deepcopy(model))
            accs.append(accuracy(m, data.test))
            if label == "fp32":
                assert accs[-1] == run_acc, (accs[-1], run_acc)  # the same evaluation
            elif size is None:
                size = summarize(m)["packed_bytes"]
        rows[label] = (accs, size)
        print(f"{label}: {accs}", file=sys.stderr, flush=True)
    ref = statistics.mean(rows["fp32"][0])
    print(f"\npost-training (no fine-tuning), fp32 models of seeds {args.seeds}, {' '.join(base)}\n")
    print("| method | test acc (mean ± std) | vs fp32 | per seed | packed model |")
    print("|---|---|---|---|---|")
    for label, (accs, size) in rows.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {label} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * (mean - ref):+.2f} pt | "
              f"{', '.join(f'{100 * a:.2f}' for a in accs)} | "
              f"{f'{size / 1000:.1f} KB' if size else '—'} |")


if __name__ == "__main__":
    main()
