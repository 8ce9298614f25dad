"""Which threshold rule transfers to new queries? Dev-only: split the dev queries in random halves, choose the
threshold on one half by each rule (``best``: the argmax of the F1 curve; ``bagged``: the median of the best-F1
thresholds of 200 query resamples, hfemb's default), measure F1 on the other half, both ways, many splits.

    python bench/threshold_rule_cv.py --dev DEV.jsonl --models NAME=FOLDER ... [--splits 30]

The models are any trained outputs (e.g. bench_config_vs_peer.py's runs); nothing here reads a test set.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import common
from bench_config_vs_peer import pair_scores

from hfemb.evaluation import metrics


def held_out_f1(qi: np.ndarray, y: np.ndarray, s: np.ndarray, splits: int, bags: int, seed: int = 0) -> dict:
    """{rule: [F1 on the other half, per split and side]} for one model's dev pairs."""
    rng = np.random.default_rng(seed)
    nq = int(qi.max()) + 1
    out = {"best": [], "bagged": []}
    for _ in range(splits):
        half = np.zeros(nq, bool)
        half[rng.permutation(nq)[: nq // 2]] = True
        for side in (half, ~half):
            choose, score = side[qi], ~side[qi]
            groups = (np.cumsum(side) - 1)[qi[choose]]  # the chosen half's queries, renumbered 0..
            thresholds = {"best": metrics.best_f1(y[choose], s[choose])["threshold"],
                          "bagged": metrics.bagged_threshold(groups, y[choose], s[choose], n_boot=bags, seed=seed)}
            for rule, t in thresholds.items():
                (row,) = metrics.threshold_sweep(y[score], s[score], [t])
                out[rule].append(row["f1"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dev", required=True, help="dev pool file (labelled pairs)")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--splits", type=int, default=30)
    parser.add_argument("--bags", type=int, default=200)
    args = parser.parse_args()
    started = time.time()
    lines = ["| model | F1 on the other half, best | bagged | Δ |", "|---|---:|---:|---:|"]
    deltas = []
    for spec in args.models:
        name, folder = spec.split("=", 1)
        qi, y, s = pair_scores(folder, args.dev)
        res = held_out_f1(qi, y, s, args.splits, args.bags)
        best, bagged = np.mean(res["best"]), np.mean(res["bagged"])
        deltas.append(bagged - best)
        lines.append(f"| {name} | {best:.4f} | {bagged:.4f} | {bagged - best:+.4f} |")
        print(lines[-1], flush=True)
    d = np.array(deltas)
    lines += ["", f"Mean Δ (bagged − best) over {len(d)} models: {d.mean():+.4f}; bagged ahead on {int((d > 0).sum())}, "
                  f"behind on {int((d < 0).sum())}. {args.splits} random half-splits of the dev queries, both ways.",
              "", f"Command: `python bench/threshold_rule_cv.py {' '.join(sys.argv[1:])}` ({time.time() - started:.0f} s)."]
    md = "\n".join(lines)
    print(md)
    common.write_outputs("threshold_rule_cv", md, {"models": args.models, "deltas": deltas})
    return 0


if __name__ == "__main__":
    sys.exit(main())
