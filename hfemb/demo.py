"""`make demo` / `python -m hfemb.demo`: the whole pipeline, offline, on CPU, in a few minutes.

Uses the embedded MIT sample of Chinese medical QA (600 pairs) and a tiny random Qwen3 with the real Qwen
BPE built locally (the real Qwen3-Embedding weights need the Hub). Every step runs the real command, printed
first, so the demo doubles as a walk-through:

1. split the sample by question into train / dev / test;
2. ``hfemb mine``: BM25 (jieba) hard + easy negatives against all answers;
3. ``python run_train.py configs/demo.json``: LoRA training with MultiNegEmbeddingTrainer;
4. ``python run_eval.py``: threshold sweep, base vs tuned, threshold chosen on dev;
5. model card + ``hfemb push --dry-run``.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from pathlib import Path

from hfemb import cli
from hfemb.data.formats import read_records, write_records
from hfemb.testing.tiny import tiny_qwen3_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parent / "resources" / "zh_medical_qa" / "internal_medicine_qa_sample.csv"


def _step(title: str) -> None:
    print(f"\n{'=' * 100}\n== {title}\n{'=' * 100}", flush=True)


def _run(argv: list[str]) -> None:
    """Run an hfemb command in this process, after printing it as a user would type it."""
    shown = {"train": ["python", "run_train.py"], "eval": ["python", "run_eval.py"]}.get(argv[0], ["hfemb", argv[0]])
    print("$ " + " ".join(shlex.quote(a) for a in shown + argv[1:]), flush=True)
    status = cli.main(argv)
    if status:
        raise SystemExit(f"demo: step failed with status {status}: {' '.join(argv)}")


def split_sample(out: Path, seed: int = 0, n_dev: int = 60, n_test: int = 60) -> None:
    records = read_records(str(SAMPLE)).records
    queries = sorted({r.query for r in records})
    random.Random(seed).shuffle(queries)
    dev, test = set(queries[:n_dev]), set(queries[n_dev:n_dev + n_test])
    parts = {"train": [r for r in records if r.query not in dev | test],
             "dev": [r for r in records if r.query in dev], "test": [r for r in records if r.query in test]}
    for name, recs in parts.items():
        write_records(recs, out / f"{name}.jsonl")
    answers = list(dict.fromkeys(p for r in records for p in r.positives))
    (out / "corpus.txt").write_text("\n".join(a.replace("\n", " ") for a in answers) + "\n", encoding="utf-8")
    print(f"{SAMPLE.name}: {len(records)} QA pairs -> train {len(parts['train'])}, dev {len(parts['dev'])}, "
          f"test {len(parts['test'])} (split by question, seed {seed}); corpus of {len(answers)} answers")


def _tables(results_md: Path) -> str:
    """The threshold table and the summary table of a `run_eval.py` report (its first two tables)."""
    tables, current = [], []
    for line in results_md.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return "\n\n".join(tables[:2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="working folder (default: demo_output)")
    args = parser.parse_args(argv)
    out = Path(args.output)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    started = time.time()

    _step("0. a tiny random Qwen3 with the real Qwen BPE (stand-in for Qwen/Qwen3-Embedding-0.6B, offline)")

    tiny = tiny_qwen3_path(out / "tiny-qwen3")
    print(f"model: {tiny}")

    _step("1. split the embedded Chinese medical QA sample by question")
    split_sample(data)

    _step("2. mine BM25 hard/easy negatives (jieba) against all answers")
    for part in ("train", "dev", "test"):
        _run(["mine", "--input", str(data / f"{part}.jsonl"), "--corpus", str(data / "corpus.txt"),
              "--output", str(data / f"{part}.mined.jsonl")])

    _step("3. train: LoRA, InfoNCE over hard + in-batch negatives")
    run_dir = out / "run"
    _run(["train", str(REPO / "configs" / "demo.json"), f"model.name_or_path={tiny}",
          f"data.train_file={data / 'train.mined.jsonl'}", f"data.eval_file={data / 'dev.mined.jsonl'}",
          f"training.output_dir={run_dir}"])

    _step("4. evaluate: base vs tuned, threshold chosen on dev, F1 on test")
    _run(["eval", "--data", str(data / "test.mined.jsonl"), "--dev", str(data / "dev.mined.jsonl"),
          "--model", f"base={tiny}", "--model", f"tuned={run_dir / 'merged'}", "--thresholds", "0.4:0.9",
          "--output-dir", str(out / "eval"), "--cache-dir", str(out / "embedding_cache")])

    _step("5. export: model card with the evaluation, and what a push would upload")
    _run(["card", str(run_dir)])
    _run(["push", str(run_dir), "--repo-id", "your-name/qwen3-embedding-demo-zh-medical", "--dry-run"])

    _step("summary: base vs tuned tiny model (from eval/results.md)")
    print(_tables(out / "eval" / "results.md"))
    print(f"\ndemo finished in {time.time() - started:.0f}s; everything is in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
