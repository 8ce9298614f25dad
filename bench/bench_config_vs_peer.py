"""The held-out check's questions on WikiQA, through hfemb's own command lines: `hfemb mine` + `python run_train.py
configs/lora.json model.name_or_path=MINILM model.finetune_type=full` against the sentence-transformers MNRL peer
at the same epochs, batch, accumulation and learning rate, over several seeds.

Rows: the peer (ST MNRL on the `hfemb mine` default rows); hfemb on the same rows; hfemb on rows mined with
``--scorer hybrid --model MPNET --teacher MPNET``; any ``--ablate NAME=OVERRIDE`` (e.g.
``no-redraw=data.redraw_negatives=false``) on the default rows and ``--hybrid-ablate NAME=OVERRIDE`` on the
hybrid ones; base all-MiniLM-L6-v2 and base all-mpnet-base-v2 (the big model).
Dev decides (best F1, ROC-AUC, MRR@10, mean over seeds); ``--test`` adds test numbers at the dev threshold with
paired query-bootstrap 95 % intervals of ΔF1 and ΔAUC against the peer of the same seed and against base mpnet,
and, with several seeds, each row's mean over seeds against the peers with one paired bootstrap over questions.

    python bench/bench_config_vs_peer.py --mpnet /path/to/all-mpnet-base-v2 --seeds 42 7 --parallel 2 [--test]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import bench_quality
import common

CONFIG = common.ROOT / "configs" / "lora.json"


def mine(source: Path, out: Path, extra: list[str]) -> Path:
    """`hfemb mine` with its defaults (pool mode is detected from the labelled pools) plus ``extra``."""
    if not out.exists():
        subprocess.run([sys.executable, "-m", "hfemb", "mine", "--input", str(source), "--output", str(out), *extra],
                       check=True, env={**os.environ, "PYTHONPATH": str(common.ROOT)})
    return out


def train_hfemb(train_file: Path, out: Path, seed: int, overrides: list[str], threads: int) -> str:
    """`run_train.py configs/lora.json` with the held-out check's overrides; reused when the same command ran."""
    argv = [sys.executable, str(common.ROOT / "run_train.py"), str(CONFIG), f"model.name_or_path={common.minilm_path()}",
            "model.finetune_type=full", f"data.train_file={train_file}", "training.bf16=false",
            f"training.seed={seed}", f"training.output_dir={out}", *overrides]
    done = out / "bench_command.json"
    if (out / "merged").exists() and done.exists() and json.loads(done.read_text())["argv"][1:] == argv[1:]:
        return str(out / "merged")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(f"{out}.log", "w") as log:
        subprocess.run(argv, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
                            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(common.ROOT)})
    done.write_text(json.dumps({"argv": argv, "seconds": round(time.time() - started)}))
    return str(out / "merged")


def train_peer(train_file: Path, out: Path, seed: int, threads: int) -> str:
    """ST MNRL (scale 20) with configs/lora.json's epochs, batch, accumulation, lr and warmup; ST's own
    linear schedule and NoDuplicatesBatchSampler, as a user would run it."""
    t = json.loads(CONFIG.read_text())["training"]
    spec = {"model": common.minilm_path(), "batch": t["per_device_train_batch_size"], "epochs": t["num_train_epochs"],
            "lr": t["learning_rate"], "warmup": t["warmup_ratio"], "accum": t["gradient_accumulation_steps"],
            "seed": seed, "threads": threads, "name": out.name, "out": str(out), "train_file": str(train_file)}
    return bench_quality.spawn("st", spec, out.parent)["model_dir"]


def ablations(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=KEY=VALUE`` specs as {NAME: [KEY=VALUE, ...]}, in order; a NAME given twice collects both overrides."""
    rows: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, override = spec.partition("=")
        if not (name and sep and "=" in override):
            raise SystemExit(f"--ablate/--hybrid-ablate {spec!r}: expected NAME=KEY=VALUE")
        rows.setdefault(name, []).append(override)
    return rows


def pair_scores(model: str, pool_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, label, cosine) of every (question, candidate) pair, as the evaluation counts them
    (`pairs_from_records`: a repeated pair once) and through its encoder and embedding cache (so the same
    vectors as the reports)."""
    from hfemb.data.formats import read_records
    from hfemb.evaluation.encoders import encode_texts
    from hfemb.evaluation.evaluate import EvalSettings, pairs_from_records

    pairs = pairs_from_records(read_records(str(pool_file)).records)
    enc = encode_texts(model, "pairs", pairs.queries, pairs.documents,
                       EvalSettings(batch_size=32, show_progress=False, plots=False))
    scores = np.einsum("pd,pd->p", enc.queries[pairs.query_index], enc.documents[pairs.doc_index])
    return pairs.query_index, (pairs.labels > 0).astype(np.int64), scores.astype(np.float64)


def paired_auc_diff(ref: str, other: str, pool_file: Path, n_bootstrap: int, seed: int = 0) -> tuple[float, float, float]:
    """ROC-AUC(other) - ROC-AUC(ref) on ``pool_file`` and its 95 % interval over questions resampled with
    replacement (the same resample for both models: a paired bootstrap)."""
    from sklearn.metrics import roc_auc_score

    idx, labels, a = pair_scores(ref, pool_file)
    _, _, b = pair_scores(other, pool_file)
    by_query = [np.flatnonzero(idx == k) for k in range(idx.max() + 1)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_bootstrap):
        take = np.concatenate([by_query[k] for k in rng.integers(0, len(by_query), len(by_query))])
        if labels[take].min() == labels[take].max():
            continue
        diffs.append(roc_auc_score(labels[take], b[take]) - roc_auc_score(labels[take], a[take]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return roc_auc_score(labels, b) - roc_auc_score(labels, a), float(lo), float(hi)


def seed_mean_vs_peer(pairs: list[tuple[str, float, str, float]], pool_file: Path, n_bootstrap: int,
                      seed: int = 0) -> dict:
    """Mean over seeds of (model - peer of the same seed) on ``pool_file``: F1 at each model's own dev threshold and
    ROC-AUC, with 95 % percentile intervals from one paired bootstrap over questions (each resample draws the same
    questions for every model of every seed; the evaluation's resamples: ``resample_weights(Q, n, seed)``).
    ``pairs``: (peer folder, peer threshold, model folder, model threshold) per seed."""
    from sklearn.metrics import roc_auc_score

    from hfemb.evaluation.metrics import f1_from_counts, query_confusion, resample_weights

    scored = [[pair_scores(peer, pool_file), peer_thr, pair_scores(model, pool_file), model_thr]
              for peer, peer_thr, model, model_thr in pairs]
    idx, labels = scored[0][0][0], scored[0][0][1]
    n_q = int(idx.max()) + 1
    columns = [(s[2], t) for run in scored for s, t in ((run[0], run[1]), (run[2], run[3]))]  # peer, model per seed
    conf = np.stack([query_confusion(idx, labels, s, t, n_groups=n_q) for s, t in columns])  # [M, Q, 3]

    def deltas(f1: np.ndarray, auc: np.ndarray) -> tuple[float, float]:  # [..., M] -> mean over seeds of model - peer
        return float(np.mean(f1[..., 1::2] - f1[..., 0::2])), float(np.mean(auc[..., 1::2] - auc[..., 0::2]))

    point = deltas(f1_from_counts(conf.sum(axis=1)), np.array([roc_auc_score(labels, s) for s, _ in columns]))
    samples = []
    for weights in resample_weights(n_q, n_bootstrap, seed):  # [b, Q] draws of each question
        f1 = f1_from_counts(np.einsum("bq,mqc->bmc", weights, conf))  # [b, M]
        for k, w in enumerate(weights):
            pair_w = w[idx]  # each pair weighted by its question's draws
            if labels[pair_w > 0].min() == labels[pair_w > 0].max():
                continue
            auc = np.array([roc_auc_score(labels, s, sample_weight=pair_w) for s, _ in columns])
            samples.append(deltas(f1[k], auc))
    if not samples:
        raise SystemExit(f"{pool_file}: no bootstrap resample holds both a relevant and an irrelevant pair")
    lo, hi = np.percentile(np.array(samples), [2.5, 97.5], axis=0)
    return {"seeds": len(pairs), "f1_diff": point[0], "f1_diff_ci": [float(lo[0]), float(hi[0])],
            "auc_diff": point[1], "auc_diff_ci": [float(lo[1]), float(hi[1])],
            "f1_at_threshold": [float(f1_from_counts(c.sum(axis=0))) for c in conf]}


def evaluate(models: dict[str, str], data: Path, dev: Path | None, folder: Path, n_bootstrap: int) -> dict:
    from hfemb.evaluation.evaluate import evaluate as run_eval

    return run_eval(models, str(data), dev_path=str(dev) if dev else None, thresholds="0.4:0.7", output_dir=str(folder),
                    print_table=False, batch_size=32, n_bootstrap=n_bootstrap, plots=False, show_progress=False)


def seed_mean_rows(test_reports: dict, models: dict[str, str], seeds: list[int], test: Path, n_bootstrap: int) -> str:
    """The test table's last part: each hfemb row's mean over seeds against the peer of the same seed
    (`seed_mean_vs_peer`), stored in ``test_reports["mean_over_seeds"]``."""
    groups = dict.fromkeys(k.rsplit(" s", 1)[0] for k in models if not k.startswith("peer "))
    lines = [f"| mean over seeds {', '.join(map(str, seeds))} (test, vs the peer of each seed) | ΔF1 @ dev thr. [95% CI] "
             "| ΔAUC [95% CI] |", "|---|---|---|"]
    test_reports["mean_over_seeds"] = {}
    for group in groups:
        pairs, reported = [], []
        for seed in seeds:
            res = test_reports[seed]["vs_peer"]["models"]
            peer, name = f"peer s{seed}", f"{group} s{seed}"
            pairs.append((models[peer], res[peer]["chosen_threshold"], models[name], res[name]["chosen_threshold"]))
            reported += [res[peer]["f1_at_chosen"], res[name]["f1_at_chosen"]]
        m = seed_mean_vs_peer(pairs, test, n_bootstrap)
        # the per-question counts must give back the evaluation's own F1 at the chosen thresholds
        assert np.allclose(m["f1_at_threshold"], reported), (m["f1_at_threshold"], reported)
        test_reports["mean_over_seeds"][group] = m
        lines.append(f"| {group} | {m['f1_diff']:+.3f} [{m['f1_diff_ci'][0]:+.3f}, {m['f1_diff_ci'][1]:+.3f}] | "
                     f"{m['auc_diff']:+.3f} [{m['auc_diff_ci'][0]:+.3f}, {m['auc_diff_ci'][1]:+.3f}] |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mpnet", default=os.environ.get("HFEMB_MPNET", "/work/models/all-mpnet-base-v2"),
                        help="all-mpnet-base-v2 folder (../shared/tools/get_mpnet.sh DEST prints it)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--ablate", nargs="*", default=[], metavar="NAME=KEY=VALUE",
                        help="extra hfemb rows on the default rows; a NAME given twice collects both overrides")
    parser.add_argument("--hybrid-ablate", nargs="*", default=[], metavar="NAME=KEY=VALUE",
                        help="extra hfemb rows on the hybrid + teacher rows; a NAME given twice collects both overrides")
    parser.add_argument("--no-hybrid", action="store_true", help="skip the hybrid + teacher rows")
    parser.add_argument("--pairs-only", action="store_true",
                        help="train from (question, positive) pairs only, mined in corpus mode (every other question's "
                             "answers are the candidates), instead of WikiQA's labelled pools; dev/test stay the pools")
    parser.add_argument("--test", action="store_true", help="also test numbers (only once dev has decided)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--out", default=str(common.RESULTS / "config_vs_peer"),
                        help="mined rows, training runs and evaluation reports (a finished run is reused when its "
                             "command line is the same: move runs away after a change of hfemb's defaults)")
    args = parser.parse_args()
    default_ablations = ablations(args.ablate)  # checked before minutes of mining
    hybrid_ablations = {} if args.no_hybrid else ablations(args.hybrid_ablate)
    started = time.time()
    out = Path(args.out)
    data = out / "data"
    train, dev, test = (common.wikiqa_split_file(s, data) for s in ("train", "dev", "test"))
    source, kind = (common.wikiqa_pairs_file(train), "pairs-") if args.pairs_only else (train, "")
    default_rows = mine(source, data / f"mined.{kind}default.jsonl", [])
    hybrid_rows = None if args.no_hybrid else mine(
        source, data / f"mined.{kind}hybrid-mpnet-teacher.jsonl",
        ["--scorer", "hybrid", "--model", args.mpnet, "--teacher", args.mpnet])

    runs = out / f"{kind}runs"  # pairs-only runs apart: a run folder reused with another spec would be retrained
    jobs: dict[str, tuple] = {}
    for seed in args.seeds:
        jobs[f"peer s{seed}"] = (train_peer, default_rows, runs / f"peer-s{seed}", seed, args.threads)
        jobs[f"hfemb s{seed}"] = (train_hfemb, default_rows, runs / f"hfemb-s{seed}", seed, [], args.threads)
        if hybrid_rows:
            jobs[f"hfemb hybrid+teacher s{seed}"] = (train_hfemb, hybrid_rows, runs / f"hybrid-s{seed}", seed, [],
                                                     args.threads)
        for name, overrides in default_ablations.items():
            jobs[f"hfemb {name} s{seed}"] = (train_hfemb, default_rows, runs / f"{name}-s{seed}", seed,
                                             overrides, args.threads)
        for name, overrides in hybrid_ablations.items():
            jobs[f"hfemb hybrid+teacher {name} s{seed}"] = (train_hfemb, hybrid_rows, runs / f"hybrid-{name}-s{seed}",
                                                            seed, overrides, args.threads)
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {label: pool.submit(fn, *rest) for label, (fn, *rest) in jobs.items()}
        models = {label: f.result() for label, f in futures.items()}
    bases = {"base all-mpnet-base-v2": args.mpnet, "base all-MiniLM-L6-v2": common.minilm_path()}

    dev_report = evaluate({**models, **bases}, dev, None, out / f"{kind}eval_dev", args.n_bootstrap)
    lines = ["| model (dev) | best F1 | ROC-AUC | MRR@10 |", "|---|---:|---:|---:|"]
    groups: dict[str, list] = {}
    for name, res in dev_report["models"].items():
        row = (res["best_f1"], res["roc_auc"], res["ranking"]["mrr@10"])
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        groups.setdefault(name.rsplit(" s", 1)[0] if name in models else name, []).append(row)
    lines += ["", "| mean over seeds (dev) | best F1 | ROC-AUC | MRR@10 |", "|---|---:|---:|---:|"]
    lines += [f"| {g} ({len(v)}) | " + " | ".join(f"{x:.3f}" for x in np.mean(v, axis=0)) + " |" for g, v in groups.items()]
    md = "\n".join(lines)
    report = {"dev": dev_report}
    if args.test:
        rows = ["| model (test) | F1 @ dev thr. | ΔF1 vs peer [95% CI] | ΔAUC vs peer [95% CI] | best F1 | ROC-AUC | "
                "MRR@10 | ΔF1 vs base mpnet [95% CI] |", "|---|---:|---|---|---:|---:|---:|---|"]
        report["test"] = {}
        for seed in args.seeds:
            peer = f"peer s{seed}"
            group = {peer: models[peer], **{k: v for k, v in models.items() if k.endswith(f" s{seed}") and k != peer},
                     **bases}
            vs_peer = evaluate(group, test, dev, out / f"{kind}eval_test_s{seed}", args.n_bootstrap)
            ordered = {"base all-mpnet-base-v2": args.mpnet, **{k: v for k, v in group.items() if "mpnet" not in k}}
            vs_mpnet = evaluate(ordered, test, dev, out / f"{kind}eval_test_s{seed}_vs_mpnet", args.n_bootstrap)
            report["test"][seed] = {"vs_peer": vs_peer, "vs_mpnet": vs_mpnet}
            for name, res in vs_peer["models"].items():
                def ci(r, first):
                    c = r.get("f1_diff_vs_first_ci")
                    return "(reference)" if first or not c else f"{r['f1_diff_vs_first']:+.3f} [{c[0]:+.3f}, {c[1]:+.3f}]"
                auc = "(reference)" if name == peer else "{:+.3f} [{:+.3f}, {:+.3f}]".format(
                    *paired_auc_diff(group[peer], group[name], test, args.n_bootstrap))
                rows.append(f"| {name} | {res['f1_at_chosen']:.3f} | {ci(res, name == peer)} | {auc} | {res['best_f1']:.3f} "
                            f"| {res['roc_auc']:.3f} | {res['ranking']['mrr@10']:.3f} | "
                            f"{ci(vs_mpnet['models'][name], 'mpnet' in name)} |")
        md += "\n\n" + "\n".join(rows)
        if len(args.seeds) > 1:
            md += "\n\n" + seed_mean_rows(report["test"], models, args.seeds, test, args.n_bootstrap)
    md += f"\n\nCommand: `python bench/bench_config_vs_peer.py {' '.join(sys.argv[1:])}` ({time.time() - started:.0f} s)."
    print(md)
    common.write_outputs("config_vs_peer_pairs" if args.pairs_only else "config_vs_peer", md, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
