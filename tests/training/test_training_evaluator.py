"""The evaluator inside training (hfemb.training.evaluator): the same numbers as run_eval's code on the same
model, eval_<metric> / eval_<name>_<metric> in train_log.jsonl, metric_for_best_model=eval_mrr@10 with
load_best_model_at_end, a BEIR folder as the only eval set, and a clear error for an unknown metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfemb.data.beir import read_beir
from hfemb.data.formats import read_records
from hfemb.errors import ConfigError
from hfemb.training.config import config_from_dict

QA = [("高血压能吃党参吗", "高血压患者可以适量食用党参，但需注意血压变化。"),
      ("糖尿病饮食注意什么", "糖尿病患者应控制碳水化合物摄入，少吃甜食。"),
      ("感冒发烧怎么办", "感冒发烧可以多喝水休息，体温过高时服用退烧药。"),
      ("失眠吃什么好", "失眠可以喝温牛奶，睡前避免咖啡和浓茶。"),
      ("胃痛怎么缓解", "胃痛时可以热敷腹部，饮食清淡，避免辛辣。"),
      ("咳嗽有痰怎么办", "咳嗽有痰可以多喝温水，必要时服用化痰药。")]


@pytest.fixture(scope="module")
def data(tmp_path_factory, zh_sample_csv):
    root = tmp_path_factory.mktemp("evaldata")
    recs = read_records(str(zh_sample_csv)).records[:24]
    with open(root / "train.jsonl", "w", encoding="utf-8") as fh:
        for i, r in enumerate(recs):
            negs = [recs[(i + 5) % 24].positives[0], recs[(i + 11) % 24].positives[0]]
            fh.write(json.dumps({"query": r.query, "positive": r.positives[0], "negative": negs}, ensure_ascii=False) + "\n")
    with open(root / "pool.jsonl", "w", encoding="utf-8") as fh:  # a labelled pool set
        for i, (q, a) in enumerate(QA):
            docs = [{"content": a, "label": 1}, {"content": QA[(i + 1) % 6][1], "label": 0},
                    {"content": QA[(i + 2) % 6][1], "label": 0}]
            fh.write(json.dumps({"query": q, "documents": docs}, ensure_ascii=False) + "\n")
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": a}, ensure_ascii=False)
                                               + "\n" for i, (_, a) in enumerate(QA)), encoding="utf-8")
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}, ensure_ascii=False) + "\n"
                                                for i, (q, _) in enumerate(QA)), encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    return root


def config(model, root, out, data=None, training=None):
    return config_from_dict({
        "model": {"name_or_path": model, "finetune_type": "lora", "torch_dtype": "float32"},
        "data": {"train_file": str(root / "train.jsonl"), "query_max_len": 32, "passage_max_len": 48,
                 "num_negatives": 2, **(data or {})},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                     "max_steps": 4, "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "seed": 0,
                     "dataloader_pin_memory": False, "disable_tqdm": True, **(training or {})}})


def test_evaluator_equals_run_eval_code(tiny_qwen3, data, tmp_path):
    """The in-training numbers of a pool set and a BEIR set equal run_eval's (evaluate / evaluate_retrieval)
    on the same model with the same lengths."""
    from hfemb.data.formats import Record  # noqa: F401
    from hfemb.evaluation.evaluate import evaluate
    from hfemb.evaluation.settings import EvalSettings
    from hfemb.evaluation.retrieval import evaluate_retrieval
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.evaluator import evaluator_from_file

    cfg = config(tiny_qwen3, data, tmp_path / "o", data={"query_max_len": 64, "passage_max_len": 64})
    model = load_embedding_model(tiny_qwen3)
    settings = EvalSettings(max_length=64, n_bootstrap=0, use_cache=False, show_progress=False, plots=False,
                            thresholds=[0.5])

    pool = evaluator_from_file(str(data / "pool.jsonl"), name=None, data_config=cfg.data)
    got = pool(model)
    ref = evaluate({"m": tiny_qwen3}, str(data / "pool.jsonl"), output_dir=tmp_path / "e1", settings=settings,
                   print_table=False)["models"]["m"]
    assert set(got) == {"best_f1", "best_threshold", "roc_auc", "average_precision", "mrr@10", "ndcg@10",
                        "recall@1", "recall@5", "recall@10"}
    for k in ("best_f1", "best_threshold", "roc_auc", "average_precision"):
        assert got[k] == pytest.approx(ref[k], abs=1e-6)
    for k in ("mrr@10", "ndcg@10", "recall@1"):
        assert got[k] == pytest.approx(ref["ranking"][k], abs=1e-6)

    beir = evaluator_from_file(str(data / "beir"), name="general", data_config=cfg.data)
    got = beir(model)
    ref = evaluate_retrieval({"m": tiny_qwen3}, read_beir(data / "beir"), settings=settings, output_dir=tmp_path / "e2",
                             print_table=False)["models"]["m"]
    for k in ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "map@100"):
        assert got[f"general_{k}"] == pytest.approx(ref["retrieval"][k], abs=1e-6)
    assert got["general_best_f1"] == pytest.approx(ref["threshold"]["best_f1"], abs=1e-6)


def test_training_logs_eval_metrics_and_keeps_best_mrr(tiny_qwen3, data, tmp_path):
    from hfemb.training.runner import run_training

    out = tmp_path / "run"
    cfg = config(tiny_qwen3, data, out, data={"eval_file": str(data / "train.jsonl"),
                                              "eval_files": {"general": str(data / "beir")}},
                 training={"eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps", "save_steps": 1,
                           "metric_for_best_model": "eval_mrr@10", "load_best_model_at_end": True,
                           "save_total_limit": 10})
    summary = run_training(cfg)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 5  # steps 1..4 and the final evaluation
    for r in evals:  # one row per evaluation: loss pass and evaluators together
        assert {"eval_mrr@10", "eval_ndcg@10", "eval_recall@10", "eval_recall@100", "eval_map@100", "eval_best_f1",
                "eval_best_threshold", "eval_general_ndcg@10", "eval_general_mrr@10", "eval_accuracy"} <= set(r)
        assert 0 <= r["eval_mrr@10"] <= 1 and 0 <= r["eval_general_recall@10"] <= 1
    during = evals[:4]
    best = max(during, key=lambda r: (r["eval_mrr@10"], -r["step"]))  # greater is better; first of equals
    assert summary["best_metric"] == pytest.approx(best["eval_mrr@10"])
    assert Path(summary["best_model_checkpoint"]).name == f"checkpoint-{best['step']}"
    assert summary["final_eval"]["eval_mrr@10"] == pytest.approx(best["eval_mrr@10"], abs=1e-6)
    assert [e["kind"] for e in summary["data"]["evaluators"]] == ["retrieval", "retrieval"]
    from hfemb.publishing.plotting import quality_series, read_train_log

    panels = dict(quality_series(read_train_log(out / "train_log.jsonl")))
    assert [k for k, _ in panels["Eval set: retrieval and F1 metrics"]] == \
        ["eval_ndcg@10", "eval_mrr@10", "eval_recall@10", "eval_best_f1"]
    assert [k for k, _ in panels["Named eval sets (data.eval_files): watch for forgetting"]] == \
        ["eval_general_best_f1", "eval_general_ndcg@10"]
    assert (out / "training_curves.png").is_file()
    card = (out / "merged" / "README.md").read_text(encoding="utf-8")
    assert "general" in card and "nDCG@10" in card


def test_beir_folder_as_the_only_eval_set(tiny_qwen3, data, tmp_path):
    from hfemb.training.runner import run_training

    out = tmp_path / "run"
    cfg = config(tiny_qwen3, data, out, data={"eval_file": str(data / "beir")},
                 training={"max_steps": 2, "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps",
                           "save_steps": 1})
    summary = run_training(cfg)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_ndcg@10" in r]
    assert len(evals) == 3 and not any("eval_loss" in r for r in rows)
    assert summary["config"]["training"]["metric_for_best_model"] == "eval_ndcg@10"
    assert summary["best_metric"] == pytest.approx(max(r["eval_ndcg@10"] for r in evals[:2]))


def test_unknown_best_metric_is_one_clear_error(tiny_qwen3, data, tmp_path):
    from hfemb.training.runner import run_training

    cfg = config(tiny_qwen3, data, tmp_path / "run", data={"eval_file": str(data / "pool.jsonl")},
                 training={"metric_for_best_model": "eval_ndcg@100"})
    with pytest.raises(ConfigError, match=r"'training.metric_for_best_model' is 'eval_ndcg@100'.*eval_best_f1"):
        run_training(cfg)
    with pytest.raises(ConfigError, match=r"data.eval_files"):
        config(tiny_qwen3, data, tmp_path / "r2", data={"eval_files": {"bad name": "x"}})


def _sharded_worker(rank, world, init_file, model_path, texts, out_dir):
    import numpy as np
    import torch.distributed as dist

    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.evaluator import encode_sharded

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = load_embedding_model(model_path)
        got = encode_sharded(model, texts, is_query=False, batch_size=4, max_length=32)
        np.save(f"{out_dir}/rank{rank}.npy", got)
    finally:
        dist.destroy_process_group()


def test_encode_sharded_two_processes_equal_one(tiny_qwen3, tmp_path):
    """Two gloo processes each encode every 2nd text; after the gather both hold all vectors, in order, equal to
    one process encoding everything."""
    import numpy as np
    import torch.multiprocessing as mp

    from hfemb.modeling.loading import load_embedding_model

    texts = [q for q, _ in QA] + [a for _, a in QA] + ["一个额外的文本"]  # 13: uneven shards
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), tiny_qwen3, texts, str(tmp_path)), nprocs=2)
    want = load_embedding_model(tiny_qwen3).encode(texts, is_query=False, batch_size=4, max_length=32)
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{r}.npy"), want, atol=1e-5)
