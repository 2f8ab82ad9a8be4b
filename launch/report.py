"""Print a results table for dqt runs and write loss plots.

    python launch/report.py RUN_DIR [RUN_DIR ...] [--out DIR]
    python launch/report.py --model RUN_DIR_OR_CHECKPOINT     # QAT size summary of one model
    python launch/report.py --link rows.json [--out DIR]      # step time per scheme and link

Writes DIR/results.md, DIR/loss_vs_step.png and DIR/loss_vs_bytes.png (DIR defaults to
``reports``). ``--model`` prints the parameters per bit-width, packed size, fp32-equivalent size
and compression ratio of a trained (QAT) model instead. ``--link`` plots the rows that
``launch/bench_link.py --json`` wrote: DIR/step_time_<model>.png.
"""

import argparse
import os
import sys

from dqt.train.report import load_run, plot, plot_link, results_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="*", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", default="reports", help="output directory (default: reports)")
    ap.add_argument("--model", help="print the QAT size summary of this run / checkpoint")
    ap.add_argument("--link", help="bench_link.py --json output: plot step time per scheme")
    args = ap.parse_args(argv)
    if args.link:
        import json

        try:
            with open(args.link) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"report: --link {args.link}: {e}", file=sys.stderr)
            return 2
        for p in plot_link(data["rows"], args.out):
            print(f"wrote {p}")
        return 0
    if args.model:
        from dqt.quant.export.summary import format_summary, summarize
        from dqt.train.export import load_trained

        try:
            model, info = load_trained(args.model)
        except FileNotFoundError as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
        print(f"{info['checkpoint']} (step {info['step']}, qat {info['qat']['name']})")
        print(format_summary(summarize(model)))
        return 0
    if not args.runs:
        ap.error("give run directories, or --model RUN_DIR")
    try:
        runs = [load_run(p) for p in args.runs]
    except FileNotFoundError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    table = results_table(runs)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    for p in plot(runs, args.out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
