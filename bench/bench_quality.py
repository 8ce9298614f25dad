"""Quality benchmark on WikiQA with the real all-MiniLM-L6-v2: base vs hfemb (full, LoRA) vs sentence-transformers.

    python bench/bench_quality.py [--epochs 1] [--batch 16] [--lr 2e-5] [--threads 1] [--ablate] [--quick]

1. WikiQA official splits, questions with at least one positive sentence (train 873, dev 126, test 243);
   training rows mined from train with ``hfemb mine`` in pool mode (each question's own candidate
   sentences, regex word tokens, the default recipe: ``--num-negatives 3 --num-hard 1``);
2. the base model; 3. hfemb's ``MultiNegEmbeddingTrainer`` through ``hfemb.training.runner.run_training`` (hfemb's
   defaults: InfoNCE at temperature 0.05 over hard + in-batch negatives, cosine schedule, weight decay
   0.01), full fine-tuning at the shared learning rate and LoRA (r 16) at hfemb's LoRA learning rate 1e-4;
4. the peer: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` (scale 20) on the same rows,
   batch size, epochs, learning rate, warmup ratio and seed, no-duplicates batch sampler (its own
   defaults otherwise: linear schedule, no weight decay);
5. ``hfemb.evaluation.evaluate.evaluate`` (the code behind ``run_eval.py``): threshold chosen on dev (best F1), test
   F1 there with a query-bootstrap interval, best test F1, ROC-AUC, MRR@10, and the 0.4-0.7 sweep.

Every training runs in its own subprocess: samples/s is the Trainer's ``train_samples_per_second`` (whole
epoch, data loading included) and peak memory the process's RSS high-water mark (``ru_maxrss``).
A last row trains hfemb full for twice the epochs: about the peer's wall time for one epoch (hfemb trains
~2x faster), i.e. the same compute budget rather than the same number of epochs.
``--ablate`` adds hfemb variants (temperature, in-batch negatives, false-negative and duplicate masking,
query/document negatives, hard/easy mix, skip-top, learning rate, schedule, weight decay, epochs, seeds)
judged on **dev only** (best F1 and AUC on dev; test is never used to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_OUT = str(common.RESULTS / "quality")
LORA_LR = 1e-4  # hfemb's default learning rate (TRAINING_DEFAULTS), the one its LoRA recipe uses


# ---- training workers (each in a subprocess) --------------------------------------------------------
def train_hfemb(spec: dict) -> dict:
    from hfemb.training.config import config_from_dict
    from hfemb.training.runner import run_training

    raw = {
        "model": {"name_or_path": spec["model"], "finetune_type": spec.get("finetune", "full"),
                  "torch_dtype": "float32", **spec.get("model_overrides", {})},
        # every lever at 3 negatives per row, as mined (data.pool_negatives is measured by bench_config_vs_peer)
        "data": {"train_file": spec["train_file"], "num_negatives": 3, "mine": False, "pool_negatives": 0},
        "loss": spec.get("loss", {}),
        "training": {"output_dir": spec["out"], "per_device_train_batch_size": spec["batch"],
                     "num_train_epochs": spec["epochs"], "learning_rate": spec["lr"], "warmup_ratio": spec["warmup"],
                     "seed": spec["seed"], "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
                     "logging_steps": 10, "dataloader_pin_memory": False, **spec.get("training", {})},
    }
    summary = run_training(config_from_dict(raw, where=f"bench {spec['name']}"))
    return {"model_dir": str(Path(spec["out"]) / "merged"), "samples_per_s": summary["train"]["train_samples_per_second"],
            "train_seconds": summary["train"]["train_runtime"], "train_loss": summary["train"].get("train_loss"),
            "rows": summary["data"]["train"]["rows"], "steps": summary["global_step"]}


def train_st(spec: dict) -> dict:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rows = common.training_rows(Path(spec["train_file"]), 3)
    model = SentenceTransformer(spec["model"], device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], num_train_epochs=spec["epochs"],
        learning_rate=spec["lr"], warmup_ratio=spec["warmup"], seed=spec["seed"],
        gradient_accumulation_steps=spec.get("accum", 1), batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", disable_tqdm=True,
        logging_steps=10, dataloader_pin_memory=False)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=common.st_dataset(rows),
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0))
    result = trainer.train()
    model_dir = Path(spec["out"]) / "merged"
    model.save(str(model_dir))
    return {"model_dir": str(model_dir), "samples_per_s": result.metrics["train_samples_per_second"],
            "train_seconds": result.metrics["train_runtime"], "train_loss": result.metrics.get("train_loss"),
            "rows": len(rows), "steps": trainer.state.global_step}


def worker(kind: str, spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = (train_hfemb if kind == "hfemb" else train_st)(spec)
    if spec.get("encode_after"):  # warm the evaluation's embedding cache in this process (parallel runs)
        from quality_recipe import encode_for_eval

        encode_for_eval(result["model_dir"], spec["encode_after"])
    result.update(peak_rss_mb=common.peak_rss_mb(), load_avg=common.uptime_load(), threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result))


def _settings(spec: dict) -> dict:
    """A run's settings: its spec without ``out`` (the folder itself, however it was spelled) and
    ``encode_after`` (which files the worker pre-encodes does not change the trained model)."""
    return {k: v for k, v in spec.items() if k not in ("out", "encode_after")}


def spawn(kind: str, spec: dict, log_dir: Path) -> dict:
    """Train in a fresh subprocess (clean peak-RSS reading); reuse a finished run with the same spec."""
    out = Path(spec["out"])
    done = out / "bench_result.json"
    if done.exists():
        previous = json.loads(done.read_text())
        if _settings(previous.get("spec", {})) == _settings(spec):
            return previous["result"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = log_dir / f"train-{spec['name']}.log"
    started = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], stdout=subprocess.PIPE,
                              stderr=fh, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training {spec['name']} failed ({proc.returncode}); see {log}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_seconds"] = round(time.time() - started, 1)
    done.write_text(json.dumps({"spec": spec, "result": result}))
    return result


# ---- evaluation -------------------------------------------------------------------------------------
def run_eval(models: dict[str, str], test: Path | None, dev: Path, out: Path, n_bootstrap: int) -> dict:
    from hfemb.evaluation.evaluate import evaluate

    data = test if test is not None else dev
    return evaluate(models, str(data), dev_path=str(dev) if test is not None else None, thresholds="0.4:0.7",
                    output_dir=str(out), print_table=False, batch_size=32, n_bootstrap=n_bootstrap, plots=False,
                    show_progress=False)


def main_table(report: dict, runs: dict) -> str:
    lines = ["| model | test F1 @ dev threshold [95% CI] | threshold (dev) | best test F1 | ROC-AUC | MRR@10 | "
             "F1 @ 0.4 / 0.5 / 0.6 / 0.7 | train samples/s | training wall time (s) | peak RSS (MiB) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, res in report["models"].items():
        ci = res.get("f1_at_chosen_ci") or [float("nan")] * 2
        sweep = " / ".join(f"{row['f1']:.3f}" for row in res["sweep"])
        mrr = (res.get("ranking") or {}).get("mrr@10", float("nan"))
        run = runs.get(name)
        speed = f"{run['samples_per_s']:.2f}" if run else "-"
        mem = f"{run['peak_rss_mb']:.0f}" if run else "-"
        wall = f"{run['wall_seconds']:.0f}" if run and "wall_seconds" in run else "-"
        lines.append(f"| {name} | {res['f1_at_chosen']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {res['chosen_threshold']:.3f} | "
                     f"{res['best_f1']:.3f} | {res['roc_auc']:.3f} | {mrr:.3f} | {sweep} | {speed} | {wall} | {mem} |")
    return "\n".join(lines)


def dev_table(report: dict, runs: dict, variants: dict) -> str:
    lines = ["| variant (dev only) | what changes | dev best F1 | dev ROC-AUC | dev MRR@10 | samples/s |",
             "|---|---|---:|---:|---:|---:|"]
    for name, res in report["models"].items():
        mrr = (res.get("ranking") or {}).get("mrr@10", float("nan"))
        run = runs.get(name)
        lines.append(f"| {name} | {variants.get(name, '')} | {res['best_f1']:.3f} | {res['roc_auc']:.3f} | {mrr:.3f} | "
                     f"{run['samples_per_s']:.2f} |" if run else
                     f"| {name} | {variants.get(name, '')} | {res['best_f1']:.3f} | {res['roc_auc']:.3f} | {mrr:.3f} | - |")
    return "\n".join(lines)


ABLATIONS = {  # name: (what changes, hfemb spec overrides, mining overrides)
    "t=0.02": ("temperature 0.02", {"loss": {"temperature": 0.02}}, {}),
    "t=0.1": ("temperature 0.1", {"loss": {"temperature": 0.1}}, {}),
    "no in-batch": ("own hard/easy negatives only", {"loss": {"in_batch_negatives": False}}, {}),
    "fn-mask": ("false-negative masking (margin 0.1)", {"loss": {"mask_false_negatives": True}}, {}),
    "hard-top-3": ("hard from the top 3 (so the 2 easy come from the bottom)", {}, {"hard_top_k": 3, "easy_bottom_k": 5}),
    "skip-top-1": ("skip the BM25 top-1 candidate", {}, {"skip_top": 1}),
    "lr=5e-5": ("learning rate 5e-5", {"lr": 5e-5}, {}),
    "linear": ("linear schedule (the peer's)", {"training": {"lr_scheduler_type": "linear"}}, {}),
    "wd=0": ("no weight decay (the peer's)", {"training": {"weight_decay": 0.0}}, {}),
    "no-dup-mask": ("duplicate texts not masked", {"loss": {"mask_duplicates": False}}, {}),
    "qq": ("+ query-query negatives", {"loss": {"query_negatives": True}}, {}),
    "epochs=2": ("2 epochs: about the peer's 1-epoch wall time", {"epochs": 2}, {}),
    "seed=1": ("seed 1 (seed-to-seed spread of the defaults)", {"seed": 1}, {}),
    "seed=2": ("seed 2 (seed-to-seed spread of the defaults)", {"seed": 2}, {}),
    "qq+dd": ("+ query-query and document-document negatives (Qwen3-Embedding's loss)",
              {"loss": {"query_negatives": True, "document_negatives": True}}, {}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate shared by hfemb full and the peer")
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup ratio, both trainers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per training process (1: stable on a shared 2-core machine)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--skip", nargs="*", default=[], choices=("lora", "st", "full", "2x"),
                        help="trainings to leave out (2x: hfemb full with twice the epochs, about the peer's wall time)")
    parser.add_argument("--ablate", nargs="*", default=None, metavar="NAME",
                        help=f"also train hfemb variants, compared on dev: {', '.join(ABLATIONS)} (none given: all)")
    parser.add_argument("--recipe", action="store_true",
                        help="also the recipe rows (bench/quality_recipe.py): base mpnet, dense / hybrid mining, the "
                             "positive-aware filter, distillation from mpnet, merging, Matryoshka, the chosen "
                             "defaults; dev decides, test with paired intervals vs the peer and vs base mpnet")
    parser.add_argument("--recipe-only", nargs="+", metavar="I", help=argparse.SUPPRESS)  # train levers I.. and stop
    parser.add_argument("--train-questions", type=int, default=0,
                        help="--recipe: train on the first N training questions only (0: all 873)")
    parser.add_argument("--levers", nargs="+", choices=("dense", "hybrid", "filter", "distill", "matryoshka", "combo",
                                                            "combo-kl", "combo-mse", "cosent"),
                        help="--recipe: only these lever rows (default: all)")
    parser.add_argument("--dev-only", action="store_true", help="--recipe: evaluate on dev only (no test numbers)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="--recipe: trainings (and minings) run this many at a time")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 training rows, 100 bootstrap resamples")
    parser.add_argument("--out", default=DEFAULT_OUT, help="training runs and evaluation reports (runs with the "
                        "same settings are reused)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    import torch

    torch.set_num_threads(args.threads)  # evaluation runs in this process
    started = time.time()
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    data_dir = common.RESULTS / "data"
    dev, test = common.wikiqa_split_file("dev", data_dir), common.wikiqa_split_file("test", data_dir)
    train_file, mining_report = common.mine_wikiqa_train(data_dir)
    if args.quick:
        small = data_dir / "wikiqa-train.mined.quick.jsonl"
        small.write_text("".join(train_file.read_text().splitlines(keepends=True)[:64]))
        train_file, args.n_bootstrap = small, 100
    base = common.minilm_path()
    shared = {"model": base, "batch": args.batch, "epochs": args.epochs, "lr": args.lr, "warmup": args.warmup,
              "seed": args.seed, "threads": args.threads, "train_file": str(train_file)}

    if args.recipe and not args.recipe_only:  # the recipe table: its own training set, rows trained in parallel
        from quality_recipe import recipe_main

        return recipe_main(args, shared, out, data_dir, spawn, run_eval, base, dev, test, started)
    if args.recipe_only:  # a helper process: train only these recipe rows (the full run reuses them)
        from quality_recipe import run_recipe

        run_recipe(shared, out, data_dir, spawn, None, {}, base, dev, test, 0, args.recipe_only)
        return 0
    runs: dict[str, dict] = {}
    label_2x = f"hfemb full, {2 * args.epochs:g} epochs (the peer's time budget)"
    plan = [("sentence-transformers MNRL", "st", {"name": "st"}),
            ("hfemb full", "hfemb", {"name": "hfemb-full"}),
            ("hfemb LoRA", "hfemb", {"name": "hfemb-lora", "finetune": "lora", "lr": LORA_LR}),
            (label_2x, "hfemb", {"name": "hfemb-full-2x", "epochs": 2 * args.epochs})]
    skip = {"st": "sentence-transformers MNRL", "full": "hfemb full", "lora": "hfemb LoRA", "2x": label_2x}
    plan = [p for p in plan if p[0] not in {skip[s] for s in args.skip}]
    for label, kind, extra in plan:
        spec = {**shared, **extra, "out": str(out / "runs" / extra["name"])}
        print(f"training {label} ...", flush=True)
        runs[label] = spawn(kind, spec, out)
        r = runs[label]
        print(f"  {r['rows']} rows, {r['steps']} steps, {r['samples_per_s']:.2f} samples/s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MiB, {r['wall_seconds']:.0f} s wall (load {r['load_avg']:.1f})", flush=True)

    models = {"base all-MiniLM-L6-v2": base, **{label: runs[label]["model_dir"] for label in runs}}
    print("evaluating on test (threshold chosen on dev) ...", flush=True)
    report = run_eval(models, test, dev, out / "eval", args.n_bootstrap)
    table = main_table(report, runs)

    ablation_md, ablation_report, variants = "", None, {}
    if args.ablate is not None:
        names = args.ablate or list(ABLATIONS)
        dev_models = {"base all-MiniLM-L6-v2": base}
        if "hfemb full" in runs:
            dev_models["hfemb full (defaults)"] = runs["hfemb full"]["model_dir"]
            variants["hfemb full (defaults)"] = "none (reference)"
            runs["hfemb full (defaults)"] = runs["hfemb full"]
        if "sentence-transformers MNRL" in runs:
            dev_models["sentence-transformers MNRL"] = runs["sentence-transformers MNRL"]["model_dir"]
        for name in names:
            what, overrides, mining = ABLATIONS[name]
            file = common.mine_wikiqa_train(data_dir, **mining)[0] if mining else train_file
            spec = {**shared, "train_file": str(file), "name": f"ablate-{name}", **overrides,
                    "out": str(out / "runs" / f"ablate-{name.replace('=', '')}")}
            label = f"hfemb {name}"
            print(f"training ablation {label} ...", flush=True)
            runs[label] = spawn("hfemb", spec, out)
            dev_models[label], variants[label] = runs[label]["model_dir"], what
        print("evaluating the ablations on dev ...", flush=True)
        ablation_report = run_eval(dev_models, None, dev, out / "eval_dev_ablation", args.n_bootstrap)
        ablation_md = "\n\nAblations, judged on dev only (best F1 over thresholds on dev, ROC-AUC on dev):\n\n" + \
            dev_table(ablation_report, runs, variants)

    recipe_md, recipe_report = "", None
    if args.recipe:
        from quality_recipe import run_recipe

        recipe_md, recipe_report = run_recipe(shared, out, data_dir, spawn, run_eval, runs, base, dev, test,
                                              args.n_bootstrap, args.recipe_only)

    data = report["data"]
    command = "python bench/bench_quality.py " + " ".join(a for a in sys.argv[1:])
    md = (f"WikiQA test: {data['eval']['queries']} questions, {data['eval']['pairs']} pairs "
          f"({data['eval']['positive_pairs']} positive); dev: {data['dev']['queries']} questions, {data['dev']['pairs']} "
          f"pairs. Training: {next(iter(runs.values()))['rows'] if runs else 0} mined rows (pool mode, 1 hard + 2 easy), "
          f"{args.epochs:g} epoch(s), batch {args.batch}, lr {args.lr:g} (hfemb LoRA: {LORA_LR:g}), warmup {args.warmup:g}, "
          f"seed {args.seed}, {args.threads} torch thread(s) per training, CPU.\n\n" + table + ablation_md + recipe_md +
          f"\n\nCommand: `{command.strip()}` ({time.time() - started:.0f} s).")
    print("\n" + md)
    other_out = Path(args.out).resolve() != Path(DEFAULT_OUT).resolve()
    name = "bench_quality" + ("_quick" if args.quick else "") + (f"_{Path(args.out).name}" if other_out else "")
    path, _ = common.write_outputs(name, md + "\n", {
        "eval": report, "ablation_eval": ablation_report, "recipe": recipe_report, "runs": runs, "mining_report": mining_report,
        "settings": vars(args), "seconds": round(time.time() - started, 1)})
    print(f"\nwritten: {path} (+ .json); evaluation reports under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
