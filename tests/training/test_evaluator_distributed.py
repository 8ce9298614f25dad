"""The evaluator inside training under torchrun (2 gloo processes on CPU): each process encodes a strided shard
of the eval texts and the shards are gathered; the eval_* metrics logged in train_log.jsonl must equal a
single-process evaluation (`EmbeddingEvaluator` on one process, all texts) of the checkpoint saved at the same
step -- for a retrieval set (uneven shards: 13 queries) and a named pool set; then export.base_merge_alphas scored by
rank 0 alone after training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hfemb.testing.torchrun import run_torchrun


def _config(model: str, root: Path, out: Path) -> dict:
    return {"model": {"name_or_path": model, "finetune_type": "lora", "torch_dtype": "float32"},
            "data": {"train_file": str(root / "train.jsonl"), "eval_file": str(root / "retrieval.jsonl"),
                     "eval_files": {"pool": str(root / "pool.jsonl")}, "query_max_len": 32, "passage_max_len": 48,
                     "num_negatives": 2},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "export": {"base_merge_alphas": [0.5, 1.0]},  # chosen by rank 0 alone after training
            "training": {"output_dir": str(out), "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
                         "max_steps": 2, "learning_rate": 5e-3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                         "logging_steps": 1, "report_to": "none", "seed": 0, "disable_tqdm": True,
                         "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps", "save_steps": 1,
                         "load_best_model_at_end": False, "save_total_limit": 10}}


def test_sharded_eval_in_training_equals_single_process_eval(tiny_qwen3, zh_sample_csv, tmp_path):
    from hfemb.data.formats import read_records
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.config import config_from_dict
    from hfemb.training.evaluator import build_evaluators

    recs = read_records(str(zh_sample_csv)).records[:29]
    write = lambda name, rows: (tmp_path / name).write_text(  # noqa: E731
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    write("train.jsonl", [{"query": r.query, "positive": r.positives[0],
                           "negative": [recs[(i + 5) % 16].positives[0], recs[(i + 9) % 16].positives[0]]}
                          for i, r in enumerate(recs[:16])])
    write("retrieval.jsonl", [{"query": r.query, "positive": r.positives[0]} for r in recs[16:29]])  # 13 queries
    write("pool.jsonl", [{"query": r.query, "documents": [{"content": r.positives[0], "label": 1},
                                                          {"content": recs[16 + (i + 3) % 13].positives[0], "label": 0},
                                                          {"content": recs[(i + 1) % 16].positives[0], "label": 0}]}
                         for i, r in enumerate(recs[16:25])])
    out = tmp_path / "run"
    (tmp_path / "run.json").write_text(json.dumps(_config(tiny_qwen3, tmp_path, out)), encoding="utf-8")
    run_torchrun(__file__, tmp_path / "run.json")

    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_ndcg@10" in r]
    assert [r["step"] for r in evals][:2] == [1, 2] and len(evals) in (2, 3)  # steps 1, 2 (+ the final evaluation)
    sizes = [json.loads((tmp_path / f"encode_sizes{r}.json").read_text()) for r in range(2)]
    # per evaluation: 13 retrieval queries, their 13 documents, 9 pool queries, 21 distinct pool documents, each
    # list split between the ranks (texts[r::2])
    assert sizes[1] == [6, 6, 4, 10] * len(evals), sizes
    assert sizes[0][:4 * len(evals)] == [7, 7, 5, 11] * len(evals), sizes  # rank 0 encodes more after training
    cfg = config_from_dict(_config(tiny_qwen3, tmp_path, out))
    evaluators = build_evaluators(cfg, [])
    assert [(ev.name, ev.kind) for ev in evaluators] == [(None, "retrieval"), ("pool", "pool")]
    names = [f"eval_{n}" for ev in evaluators for n in ev.metric_names()]
    assert {"eval_ndcg@10", "eval_mrr@10", "eval_pool_best_f1", "eval_pool_mrr@10"} <= set(names)
    checked = set()
    for row in evals:
        model = load_embedding_model(str(out / f"checkpoint-{row['step']}"), padding_free="auto")
        want = {}
        for ev in evaluators:  # one process, every text: the oracle
            want.update({f"eval_{k}": v for k, v in ev(model).items()})
        for name in names:
            assert row[name] == pytest.approx(want[name], abs=1e-6), (row["step"], name)
        checked.add(row["step"])
    assert checked == {1, 2}
    # after training rank 0 alone scored each alpha on every text of the set that reports the metric (no shard, no
    # collective: rank 1 had left; the pool set need not run), and the alpha-1 value is the trained model's (the
    # adapter merged in fp32 vs the last evaluation)
    assert sizes[0][-4:] == [13, 13] * 2 and sizes[0][-6:-4] != [9, 21], sizes
    summary = json.loads((out / "train_summary.json").read_text())
    chosen_on = summary["base_merge"]["chosen_on"]
    assert chosen_on["metric"] == "ndcg@10" and set(chosen_on["values"]) == {"0.5", "1"}
    assert chosen_on["values"]["1"] == pytest.approx(evals[-1]["eval_ndcg@10"], abs=1e-4)
    assert summary["base_merge"]["alpha"] == chosen_on["chosen"]
    # the model did change between the two evaluations (the comparison is not of one constant)
    assert evals[0]["eval_pool_average_precision"] != evals[1]["eval_pool_average_precision"] \
        or evals[0]["eval_ndcg@10"] != evals[1]["eval_ndcg@10"] or evals[0]["eval_best_threshold"] != \
        evals[1]["eval_best_threshold"]


def _torchrun_main(config: str) -> int:
    """Each process: train through the real CLI, recording how many texts each ``EmbeddingModel.encode`` call got
    (only the evaluators call it during training)."""
    from hfemb.cli import main
    from hfemb.modeling.model import EmbeddingModel
    from hfemb.training.distributed import rank

    sizes, encode = [], EmbeddingModel.encode

    def recording(self, texts, **kw):
        sizes.append(len(texts))
        return encode(self, texts, **kw)

    EmbeddingModel.encode = recording
    code = main(["train", config])
    Path(config).with_name(f"encode_sizes{rank()}.json").write_text(json.dumps(sizes))
    return code


if __name__ == "__main__":  # run by torchrun from the test
    sys.exit(_torchrun_main(sys.argv[1]))
