"""The recipe rows of ``bench_quality.py --recipe``: model-aware mining, distillation, merging and Matryoshka
on WikiQA with all-MiniLM-L6-v2 as the student and the real all-mpnet-base-v2 as the big base and teacher.

Every row trains on the same 873 questions' rows (one per positive, 1 hard + 2 easy negatives; only how the
negatives are chosen and whether teacher scores come along differ), for the same epochs, batch, learning
rate and seed as the peer. Decisions are taken on **dev** (dev table); test numbers come last, with paired
query-bootstrap intervals of the F1 difference against the peer and against base mpnet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

MPNET = os.environ.get("HFEMB_MPNET", "/work/models/all-mpnet-base-v2")
# The model that ranks candidates for dense / hybrid mining. Default: the student's own base (MiniLM,
# "the base itself" / ANCE-style); HFEMB_MINING_MODEL=$MPNET ranks with the big model instead (5x the
# encoding time: ~9,200 pool texts, too slow for the shared 2-core machine this table was measured on).
MINING_MODEL = os.environ.get("HFEMB_MINING_MODEL") or common.minilm_path()
_RANKER = "mpnet" if MINING_MODEL == MPNET else "MiniLM"

# tag: (what, `hfemb mine` arguments beyond pool mode + regex tokens + the default 1 hard + 2 easy)
MINED = {
    "default": ("BM25, `hfemb mine` defaults", []),
    "dense": (f"negatives ranked by {_RANKER}'s cosine", ["--scorer", "dense", "--model", MINING_MODEL]),
    "hybrid": (f"negatives ranked by RRF of BM25 and {_RANKER}", ["--scorer", "hybrid", "--model", MINING_MODEL]),
    "hybrid-filter95": (f"hybrid + positive-aware filter (drop candidates {_RANKER} scores above 0.95 x the positive)",
                        ["--scorer", "hybrid", "--model", MINING_MODEL, "--max-relative-score", "0.95"]),
    "bm25-teacher": ("BM25 negatives + mpnet teacher scores (distillation on by default)", ["--teacher", MPNET]),
    "hybrid-teacher": (f"hybrid ({_RANKER}) + mpnet teacher scores (distillation on by default)",
                       ["--scorer", "hybrid", "--model", MINING_MODEL, "--teacher", MPNET]),
}

# label: (what, mined tag or None = BM25 default, hfemb spec overrides)
LEVERS = {
    "hfemb dense mining": ("dense", {}),
    "hfemb hybrid mining": ("hybrid", {}),
    "hfemb hybrid + positive-aware filter": ("hybrid-filter95", {}),
    "hfemb distillation from mpnet (BM25 negatives)": ("bm25-teacher", {}),
    "hfemb Matryoshka 384/256/128/64": (None, {"loss": {"matryoshka_dims": [384, 256, 128, 64]}}),
    "hfemb hybrid + teacher (defaults)": ("hybrid-teacher", {}),
    "hfemb hybrid + teacher, KL distillation 1.0": ("hybrid-teacher", {"loss": {"distill_weight": 1.0}}),
    "hfemb hybrid + teacher, MSE distillation 10": ("hybrid-teacher", {"loss": {"distill_weight": 10.0,
                                                                                "distill_loss": "mse"}}),
    "hfemb + CoSENT pair ranking 1.0": (None, {"loss": {"pair_rank_weight": 1.0}}),
}
LEVER_KEYS = {"dense": "hfemb dense mining", "hybrid": "hfemb hybrid mining",
              "filter": "hfemb hybrid + positive-aware filter", "distill": "hfemb distillation from mpnet (BM25 negatives)",
              "matryoshka": "hfemb Matryoshka 384/256/128/64", "combo": "hfemb hybrid + teacher (defaults)",
              "combo-kl": "hfemb hybrid + teacher, KL distillation 1.0",
              "combo-mse": "hfemb hybrid + teacher, MSE distillation 10", "cosent": "hfemb + CoSENT pair ranking 1.0"}
MERGE_ALPHA = 0.5  # LM-Cocktail-style merge of the tuned BM25-default model with its base
TRUNCATE_DIM = 128


def train_source(data_dir: Path, questions: int = 0) -> Path:
    """WikiQA train pools (questions with a positive), or only the first ``questions`` of them."""
    source = common.wikiqa_split_file("train", data_dir)
    if not questions:
        return source
    small = data_dir / f"wikiqa-train.q{questions}.pos.jsonl"
    if not small.exists():
        small.write_text("".join(source.read_text().splitlines(keepends=True)[:questions]))
    return small


def encode_for_eval(model_dir: str, files: list[str]) -> None:
    """Encode the queries and candidates of ``files`` with ``model_dir`` through the evaluation's cache."""
    from hfemb.data.formats import read_records
    from hfemb.evaluation.encoders import encode_texts
    from hfemb.evaluation.evaluate import EvalSettings

    records = [r for f in files for r in read_records(f).records]
    queries = list(dict.fromkeys(r.query for r in records))
    docs = list(dict.fromkeys(t for r in records for t, _ in r.candidates))
    encode_texts(model_dir, "prewarm", queries, docs, EvalSettings(show_progress=False, plots=False))


def mine(tag: str, data_dir: Path, source: Path | None = None) -> tuple[Path, dict]:
    """Mined rows for ``tag`` (cached by file name), via the `hfemb mine` command line."""
    source = source or common.wikiqa_split_file("train", data_dir)
    stem = source.name.replace(".pos.jsonl", "")
    out = data_dir / f"{stem}.mined.{tag}.jsonl"
    if not out.exists():
        started = time.time()
        argv = [sys.executable, "-m", "hfemb", "mine", "--input", str(source), "--output", str(out), "--mode", "pool",
                "--tokenizer", "regex", *MINED[tag][1]]
        subprocess.run(argv, check=True, env={**os.environ, "PYTHONPATH": str(common.ROOT)})
        print(f"  mined {tag} in {time.time() - started:.0f} s", flush=True)
    return out, json.loads(Path(f"{out}.report.json").read_text())


def merged_model(tuned: str, base: str, out: Path, alpha: float = MERGE_ALPHA) -> tuple[str, float]:
    from hfemb.modeling.merge_weights import PROVENANCE_FILE, merge_weights, public_name

    target = out / "runs" / f"merged-alpha{alpha:g}"
    started = time.time()
    record = target / PROVENANCE_FILE
    if not record.exists() or json.loads(record.read_text())["tuned"] != public_name(tuned):
        merge_weights(base, tuned, target, alpha, "linear")
    return str(target), time.time() - started


def dev_and_test(run_eval, models: dict[str, str], dev: Path, test: Path, out: Path, n_bootstrap: int,
                 references: list[str]) -> tuple[dict, dict[str, dict]]:
    """Dev report (every model, thresholds irrelevant: best F1 / AUC / MRR on dev) and, per reference model,
    a test report with that model first (paired F1 differences against it)."""
    dev_report = run_eval(models, None, dev, out / "eval_recipe_dev", n_bootstrap)
    tests = {}
    for ref in references:
        ordered = {ref: models[ref], **{k: v for k, v in models.items() if k != ref}}
        tag = "peer" if "MNRL" in ref else "mpnet"
        tests[ref] = run_eval(ordered, test, dev, out / f"eval_recipe_test_vs_{tag}", n_bootstrap)
    return dev_report, tests


def truncated_eval(models: dict[str, str], dev: Path, test: Path, out: Path, n_bootstrap: int) -> dict:
    from hfemb.evaluation.evaluate import evaluate

    return evaluate(models, str(test), dev_path=str(dev), thresholds="0.4:0.7", output_dir=str(out / "eval_recipe_128"),
                    print_table=False, batch_size=32, n_bootstrap=n_bootstrap, plots=False, show_progress=False,
                    truncate_dim=TRUNCATE_DIM)


def recipe_table(dev_report: dict, tests: dict[str, dict], runs: dict, whats: dict, peer: str, mpnet: str) -> str:
    lines = ["| model | what changes | dev best F1 | dev AUC | dev MRR@10 | test F1 @ dev thr. | ΔF1 vs peer [95% CI] | "
             "ΔF1 vs base mpnet [95% CI] | best test F1 | test AUC | test MRR@10 | train wall (s) |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    vs_peer, vs_mpnet = tests[peer]["models"], tests[mpnet]["models"]
    for name, res in vs_peer.items():
        d = dev_report["models"][name]
        dmrr = (d.get("ranking") or {}).get("mrr@10", float("nan"))
        mrr = (res.get("ranking") or {}).get("mrr@10", float("nan"))

        def diff(r):
            ci = r.get("f1_diff_vs_first_ci")
            return f"{r['f1_diff_vs_first']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"

        run = runs.get(name)
        wall = f"{run['wall_seconds']:.0f}" if run and "wall_seconds" in run else "-"
        lines.append(f"| {name} | {whats.get(name, '')} | {d['best_f1']:.3f} | {d['roc_auc']:.3f} | {dmrr:.3f} | "
                     f"{res['f1_at_chosen']:.3f} | {diff(res) if name != peer else '(reference)'} | "
                     f"{diff(vs_mpnet[name]) if name != mpnet else '(reference)'} | {res['best_f1']:.3f} | "
                     f"{res['roc_auc']:.3f} | {mrr:.3f} | {wall} |")
    return "\n".join(lines)


def dev_only_table(report: dict, runs: dict, whats: dict) -> str:
    lines = ["| model | what changes | dev best F1 | dev ROC-AUC | dev MRR@10 | train wall (s) |", "|---|---|---:|---:|---:|---:|"]
    for name, res in report["models"].items():
        mrr = (res.get("ranking") or {}).get("mrr@10", float("nan"))
        run = runs.get(name)
        wall = f"{run['wall_seconds']:.0f}" if run and "wall_seconds" in run else "-"
        lines.append(f"| {name} | {whats.get(name, '')} | {res['best_f1']:.3f} | {res['roc_auc']:.3f} | {mrr:.3f} | {wall} |")
    return "\n".join(lines)


def truncated_table(report: dict) -> str:
    lines = [f"| model at {TRUNCATE_DIM} dims | test F1 @ dev thr. [95% CI] | best test F1 | test AUC | test MRR@10 |",
             "|---|---|---:|---:|---:|"]
    for name, res in report["models"].items():
        ci = res.get("f1_at_chosen_ci") or [float("nan")] * 2
        mrr = (res.get("ranking") or {}).get("mrr@10", float("nan"))
        lines.append(f"| {name} | {res['f1_at_chosen']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {res['best_f1']:.3f} | "
                     f"{res['roc_auc']:.3f} | {mrr:.3f} |")
    return "\n".join(lines)


def run_recipe(shared: dict, out: Path, data_dir: Path, spawn, run_eval, runs: dict, base: str, dev: Path,
               test: Path, n_bootstrap: int, only: list[str] | None = None) -> tuple[str, dict]:
    """Train the lever rows, merge, evaluate on dev and test; returns (markdown, raw reports). ``only``: train
    just these levers (by position in LEVERS, e.g. to train in two processes at once) and stop."""
    peer, default = "sentence-transformers MNRL", "hfemb full"
    whats = {peer: "the peer: ST MNRL on the BM25 rows", default: "hfemb defaults on the BM25 rows (today)",
             "base all-MiniLM-L6-v2": "the student, untuned", "base all-mpnet-base-v2": "the big base model (5x)"}
    mining_reports = {}
    for i, (label, (tag, overrides)) in enumerate(LEVERS.items()):
        if only is not None and str(i) not in only:
            continue
        name = "recipe-" + label.split("hfemb ", 1)[1].replace(" ", "-").replace("/", "-").replace("+", "p")[:40]
        if os.environ.get("HFEMB_RECIPE_FINISHED_ONLY") and not (out / "runs" / name / "bench_result.json").exists():
            print(f"skipping {label}: not trained (HFEMB_RECIPE_FINISHED_ONLY)", flush=True)
            continue
        file = mine(tag, data_dir) if tag else (Path(shared["train_file"]), None)
        if tag:
            mining_reports[tag] = file[1]
        spec = {**shared, "train_file": str(file[0]), "name": name, **overrides, "out": str(out / "runs" / name)}
        print(f"training {label} ...", flush=True)
        runs[label] = spawn("hfemb", spec, out)
        whats[label] = MINED[tag][0] if tag else "Matryoshka loss at 384/256/128/64 (BM25 rows)"
    if only is not None:
        return "", {}
    return evaluate_recipe(runs, out, base, dev, test, n_bootstrap, {t: (None, r) for t, r in mining_reports.items()})


def evaluate_recipe(runs: dict, out: Path, base: str, dev: Path, test: Path, n_bootstrap: int, mined: dict
                    ) -> tuple[str, dict]:
    """Merge, then evaluate every trained row on dev and test; returns (markdown, raw reports)."""
    from hfemb.evaluation.evaluate import evaluate

    def run_eval(models, test_file, dev_file, folder, n):
        data = test_file if test_file is not None else dev_file
        return evaluate(models, str(data), dev_path=str(dev_file) if test_file is not None else None,
                        thresholds="0.4:0.7", output_dir=str(folder), print_table=False, batch_size=32,
                        n_bootstrap=n, plots=False, show_progress=False)

    peer, default = "sentence-transformers MNRL", "hfemb full"
    whats = {peer: "the peer: ST MNRL on the BM25 rows", default: "hfemb defaults on the BM25 rows (today)",
             "base all-MiniLM-L6-v2": "the student, untuned", "base all-mpnet-base-v2": "the big base model (5x)"}
    for label, (tag, _) in LEVERS.items():
        whats[label] = MINED[tag][0] if tag else "Matryoshka loss at 384/256/128/64 (BM25 rows)"
    mining_reports = {t: r for t, (_, r) in mined.items()}
    merged, merge_seconds = merged_model(runs[default]["model_dir"], base, out)
    merge_label = f"hfemb merged with base (alpha {MERGE_ALPHA:g})"
    whats[merge_label] = f"(1-a) x base + a x tuned BM25-default weights, {merge_seconds:.0f} s"
    models = {peer: runs[peer]["model_dir"], "base all-mpnet-base-v2": MPNET, "base all-MiniLM-L6-v2": base,
              default: runs[default]["model_dir"], **{label: runs[label]["model_dir"] for label in LEVERS if label in runs},
              merge_label: merged}
    print("evaluating the recipe rows on dev" + (" and test ..." if test else " only ..."), flush=True)
    if test is None:  # dev only (a partial run): the decisions' table, no test numbers
        dev_report = run_eval(models, None, dev, out / "eval_recipe_dev", n_bootstrap)
        return ("\n\nRecipe rows on **dev only**:\n\n" + dev_only_table(dev_report, runs, whats),
                {"dev": dev_report, "mining": mining_reports})
    dev_report, tests = dev_and_test(run_eval, models, dev, test, out, n_bootstrap, [peer, "base all-mpnet-base-v2"])
    trunc = truncated_eval({k: models[k] for k in (peer, default, "hfemb Matryoshka 384/256/128/64") if k in models},
                           dev, test, out, n_bootstrap)
    md = ("\n\nRecipe rows (same rows, epochs, batch, lr and seed; dev columns decide, test columns report):\n\n" +
          recipe_table(dev_report, tests, runs, whats, peer, "base all-mpnet-base-v2") +
          f"\n\nAt {TRUNCATE_DIM} dimensions (first {TRUNCATE_DIM} coordinates, re-normalised; threshold chosen on dev):\n\n" +
          truncated_table(trunc) + "\n\nMining: " + "; ".join(
              f"{tag} {rep['total_seconds']:.0f} s ({rep['rows_written']} rows, "
              f"{rep['score_filtered_candidates']} candidates filtered)" for tag, rep in mining_reports.items()))
    return md, {"dev": dev_report, "tests": tests, "truncated": trunc, "mining": mining_reports}


def recipe_main(args, shared: dict, out: Path, data_dir: Path, spawn, run_eval, base: str, dev: Path, test: Path,
                started: float) -> int:
    """``bench_quality.py --recipe``: mine every variant, train the peer, hfemb's defaults and each lever (in
    parallel), merge, evaluate (dev decides; test with paired intervals vs the peer and vs base mpnet)."""
    source = train_source(data_dir, args.train_questions)
    out = out / (f"recipe-q{args.train_questions}" if args.train_questions else "recipe")
    out.mkdir(parents=True, exist_ok=True)
    levers = {k: v for k, v in LEVERS.items() if not args.levers or k in {LEVER_KEYS[x] for x in args.levers}}
    warm = [str(dev)] if args.dev_only else [str(dev), str(test)]
    default_file, default_report = mine("default", data_dir, source)
    shared = {**shared, "train_file": str(default_file), "encode_after": warm}
    runs: dict[str, dict] = {}
    mined = {"default": (default_file, default_report)}

    def train(label: str, kind: str, spec: dict):
        spec["out"] = str(out / "runs" / spec["name"])
        try:
            result = spawn(kind, spec, out)
        except RuntimeError as exc:  # reported, and the row left out
            print(f"  {label}: {exc}", flush=True)
            return
        runs[label] = result
        print(f"  {label}: {result['rows']} rows, {result['steps']} steps, {result['wall_seconds']:.0f} s wall", flush=True)

    def lever(label: str, tag: str | None, overrides: dict):
        if tag and tag not in mined:
            try:
                mined[tag] = mine(tag, data_dir, source)
            except subprocess.CalledProcessError as exc:
                print(f"  {label}: mining failed ({exc})", flush=True)
                return
        name = "recipe-" + label.split("hfemb ", 1)[1].replace(" ", "-").replace("/", "-").replace("+", "p")[:40]
        train(label, "hfemb", {**shared, "train_file": str(mined[tag or "default"][0]), "name": name, **overrides})

    # the peer and hfemb's defaults start at once; each lever mines (embeddings cached: the hybrid and teacher
    # minings first, the rest reuse them) and then trains
    order = sorted(levers.items(), key=lambda kv: kv[1][0] not in ("hybrid", "bm25-teacher"))
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = [pool.submit(train, "sentence-transformers MNRL", "st", {**shared, "name": "st"}),
                   pool.submit(train, "hfemb full", "hfemb", {**shared, "name": "hfemb-full"})]
        futures += [pool.submit(lever, label, tag, overrides) for label, (tag, overrides) in order]
        for f in futures:
            f.result()
    encode_for_eval(MPNET, warm)
    encode_for_eval(base, warm)
    if "hfemb full" not in runs or "sentence-transformers MNRL" not in runs:
        print("the peer or hfemb's default run failed: no table", flush=True)
        return 1
    md, report = evaluate_recipe(runs, out, base, dev, None if args.dev_only else test, args.n_bootstrap, mined)
    rows = next(iter(runs.values()))["rows"] if runs else 0
    command = "python bench/bench_quality.py " + " ".join(sys.argv[1:])
    md = (f"WikiQA; training: the first {args.train_questions or 873} train questions with a positive ({rows} rows, "
          f"1 hard + 2 easy negatives each), {args.epochs:g} epoch(s), batch {args.batch}, lr {args.lr:g}, warmup "
          f"{args.warmup:g}, seed {args.seed}, {args.threads} torch thread(s) per training, CPU; dev "
          f"{report['dev']['data']['eval']['queries']} questions" + ("" if args.dev_only else ", test " + str(
              report['tests']['sentence-transformers MNRL']['data']['eval']['queries']) + " questions") + "." + md +
          f"\n\nCommand: `{command.strip()}` ({time.time() - started:.0f} s).")
    print("\n" + md)
    name = "bench_quality_recipe" + (f"_q{args.train_questions}" if args.train_questions else "")
    path, _ = common.write_outputs(name, md + "\n", {"recipe": report, "runs": runs, "settings": vars(args)})
    print(f"\nwritten: {path} (+ .json)")
    return 0
