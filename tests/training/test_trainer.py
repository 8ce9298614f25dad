"""MultiNegEmbeddingTrainer on the tiny Qwen3 (real Qwen BPE): decay groups, LoRA updates only the
adapter, gradient accumulation, checkpointing + LoRA, outputs (adapter/merged), resume, eval metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hfemb.training.config import config_from_dict
from hfemb.data.formats import read_records


@pytest.fixture(scope="module")
def mined_file(tmp_path_factory, zh_sample_csv):
    """24 real Chinese QA rows, each with 2 negatives (other rows' answers), as a mined JSONL file."""
    recs = read_records(str(zh_sample_csv)).records[:24]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(recs):
            negs = [recs[(i + 5) % 24].positives[0], recs[(i + 11) % 24].positives[0]]
            fh.write(json.dumps({"query": r.query, "positive": r.positives[0], "negative": negs}, ensure_ascii=False) + "\n")
    return str(path)


def make_config(model_path, train_file, out, finetune="lora", training=None, **sections):
    raw = {
        "model": {"name_or_path": model_path, "finetune_type": finetune, "torch_dtype": "float32"},
        # pool_negatives 0: rows as mined (the tests of whole-pool draws, the default, set it: test_pool_negatives)
        "data": {"train_file": train_file, "query_max_len": 32, "passage_max_len": 48, "num_negatives": 2,
                 "pool_negatives": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                     "num_train_epochs": 1, "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none",
                     "save_strategy": "no", "seed": 0, "dataloader_pin_memory": False, "disable_tqdm": True,
                     **(training or {})},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return config_from_dict(raw)


def build_trainer(cfg, rows=None):
    from hfemb.training.collator import MultiNegCollator
    from hfemb.training.data_rows import load_rows
    from hfemb.training.run_setup import build_model, training_arguments
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    if rows is None:
        rows = load_rows(cfg, cfg.data.train_file, Path(cfg.training["output_dir"]) / "cache", {}, "train")
    model = build_model(cfg)
    args = training_arguments(cfg, has_eval=False)
    collator = MultiNegCollator(model=model, query_max_len=32, passage_max_len=48, num_negatives=cfg.data.num_negatives)
    return MultiNegEmbeddingTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                                    loss_config=cfg.loss), rows


def test_weight_decay_groups_exclude_every_qwen3_norm(tiny_qwen3, mined_file, tmp_path):
    trainer, _ = build_trainer(make_config(tiny_qwen3, mined_file, tmp_path, finetune="full",
                                           training={"weight_decay": 0.1}))
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    no_decay = names - decay
    assert no_decay == {
        "backbone.norm.weight",
        *(f"backbone.layers.{i}.{m}" for i in range(2) for m in (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "self_attn.q_norm.weight", "self_attn.k_norm.weight")),
    }
    assert "backbone.layers.0.self_attn.q_proj.weight" in decay and "backbone.embed_tokens.weight" in decay
    opt = trainer.create_optimizer()
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    params = dict(trainer.model.named_parameters())
    assert by_decay[0.1] == {id(params[n]) for n in decay}
    assert by_decay[0.0] == {id(params[n]) for n in no_decay}


def test_lora_steps_change_adapter_only(tiny_qwen3, mined_file, tmp_path):
    trainer, _ = build_trainer(make_config(tiny_qwen3, mined_file, tmp_path, training={"max_steps": 2}))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert all(after[n].requires_grad for n in lora) and not any(after[n].requires_grad for n in base)
    # lora_B starts at zero and must have moved; every base weight is bit-identical
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in base)


def test_gradient_accumulation_divides_once(tiny_qwen3, mined_file, tmp_path):
    """One optimizer step on 4 rows (batch 4) equals one step on 2x2 rows (batch 2, accumulation 2) when the
    loss has no cross-row terms (own negatives only): the Trainer divides the mean loss by 2 exactly once."""
    common = {"max_steps": 1, "learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant",
              "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 0.0}
    results = []
    for bs, ga in ((4, 1), (2, 2)):
        cfg = make_config(tiny_qwen3, mined_file, tmp_path / f"bs{bs}", loss={"in_batch_negatives": False},
                          training={**common, "per_device_train_batch_size": bs, "gradient_accumulation_steps": ga})
        trainer, rows = build_trainer(cfg)
        trainer.train_dataset = rows[:4]
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows[:4])
        trainer.train()
        results.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n})
    moved = [n for n in results[0] if "lora_B" in n]
    assert any(results[0][n].abs().max() > 1e-4 for n in moved)
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_with_lora_trains(tiny_qwen3, mined_file, tmp_path):
    cfg = make_config(tiny_qwen3, mined_file, tmp_path, training={"max_steps": 2, "gradient_checkpointing": True})
    trainer, _ = build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    out = trainer.train()
    qwen3 = trainer.model.backbone.base_model.model
    assert qwen3.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in qwen3.layers)
    assert np.isfinite(out.training_loss)
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_run_training_outputs_and_eval_metrics(tiny_qwen3, mined_file, tmp_path):
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.runner import run_training

    cfg = make_config(tiny_qwen3, mined_file, tmp_path / "run", data={"eval_ratio": 0.25},
                      training={"num_train_epochs": 2, "eval_strategy": "epoch", "save_strategy": "epoch"})
    summary = run_training(cfg)
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "merged" / "adapter_config.json").exists() and not (out / "merged" / "adapter_model.safetensors").exists()
    # 24 queries: 6 held out for eval, 18 train rows -> 5 steps per epoch with batch 4
    assert summary["data"]["train"]["rows_after_eval_split"] == 18 and summary["data"]["eval"]["rows"] == 6
    assert summary["global_step"] == 10
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_logs = [r for r in log if "loss" in r]
    eval_logs = [r for r in log if "eval_loss" in r]
    assert len(train_logs) == 10 and all({"accuracy", "learning_rate", "grad_norm"} <= set(r) for r in train_logs)
    assert all({"eval_accuracy", "eval_positive_similarity", "eval_negative_similarity", "eval_margin"} <= set(r)
               for r in eval_logs) and len(eval_logs) >= 2
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["best_metric"] == min(r["eval_loss"] for r in eval_logs[:2])
    # merged == adapter embeddings
    texts = ["高血压能吃党参吗？", "The quick brown fox", "肝病患者的饮食"]
    a = load_embedding_model(str(out / "adapter")).encode(texts, is_query=True)
    m = load_embedding_model(str(out / "merged")).encode(texts, is_query=True)
    np.testing.assert_allclose(a, m, atol=1e-5)
    base = load_embedding_model(tiny_qwen3).encode(texts, is_query=True)
    assert np.abs(base - m).max() > 1e-3  # training changed the model


def test_resume_continues_from_saved_step(tiny_qwen3, mined_file, tmp_path):
    def cfg(out, steps):
        # constant LR: a 2-step and a 4-step cosine schedule differ from the first step on
        return make_config(tiny_qwen3, mined_file, out, training={
            "max_steps": steps, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 3,
            "lr_scheduler_type": "constant", "warmup_ratio": 0.0})

    assert_resume_equals_uninterrupted(cfg, tmp_path)


def assert_resume_equals_uninterrupted(cfg, tmp_path) -> None:
    """``cfg(out, steps)`` run 4 steps straight, and 2 steps then resumed to 4 (checkpoints every 2 steps): the
    resumed run starts from checkpoint-2 and its adapter equals the uninterrupted run's."""
    from hfemb.training.runner import run_training

    run_training(cfg(tmp_path / "full", 4))
    run_training(cfg(tmp_path / "cut", 2))
    summary = run_training(cfg(tmp_path / "cut", 4), resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_per_query_stats_by_hand():
    from hfemb.training.trainer import aggregate_eval_stats, per_query_stats

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])  # groups of 2: (pos, neg)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    stats = per_query_stats(q, d, logits, torch.tensor([0, 0]))
    torch.testing.assert_close(stats, torch.tensor([[1.0, 0.8, 0.6, 0.6], [0.0, 1.0, 0.0, 0.0]]))
    metrics = aggregate_eval_stats(type("P", (), {"predictions": stats.numpy()})())
    assert metrics == pytest.approx({"accuracy": 0.5, "positive_similarity": 0.9, "negative_similarity": 0.3, "margin": 0.6})


def test_raw_data_is_mined_on_the_fly_and_cached(tiny_qwen3, zh_sample_csv, tmp_path):
    from hfemb.training.data_rows import load_rows

    recs = read_records(str(zh_sample_csv)).records[:30]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"query": r.query, "pos_doc": r.positives[0]}, ensure_ascii=False) + "\n"
                           for r in recs), encoding="utf-8")
    cfg = make_config(tiny_qwen3, str(raw), tmp_path / "o", mining={"tokenizer": "jieba", "hard_top_k": 5,
                                                                      "easy_bottom_k": 5, "num_hard": 1})
    report: dict = {}
    rows = load_rows(cfg, str(raw), tmp_path / "cache", report, "train")
    mined = report["train"]["mining"]
    assert report["train"]["format"] == "pos_doc" and mined["mode"] == "corpus"
    assert mined["negatives"] == {"hard": 30, "easy": 30, "random": 0} and mined["rows_written"] == 30
    assert len(rows) == 30 and all(len(r["negatives"]) == 2 and r["positive"] not in r["negatives"] for r in rows)
    answers = {r.positives[0] for r in recs}
    assert all(set(r["negatives"]) <= answers for r in rows)
    again: dict = {}
    assert load_rows(cfg, str(raw), tmp_path / "cache", again, "train") == rows
    assert again["train"]["mining"]["cache"] == mined["cache"]
    assert len(list((tmp_path / "cache").glob("mined-*.jsonl"))) == 1


def test_jsonl_log_is_replaced_only_when_training_begins(tmp_path):
    from types import SimpleNamespace

    from hfemb.training.trainer import JsonlLogCallback

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n', encoding="utf-8")
    state = SimpleNamespace(is_world_process_zero=True, global_step=2, epoch=1.0)
    JsonlLogCallback(str(log), fresh=True)  # constructed (the run may still fail while setting up): kept
    assert log.read_text(encoding="utf-8") == '{"step": 1}\n'
    resumed = JsonlLogCallback(str(log), fresh=False)
    resumed.on_train_begin(None, state, None)
    resumed.on_log(None, state, None, logs={"loss": 0.5})
    assert [json.loads(x)["step"] for x in log.read_text(encoding="utf-8").splitlines()] == [1, 2]
    fresh = JsonlLogCallback(str(log), fresh=True)
    fresh.on_train_begin(None, state, None)
    fresh.on_log(None, state, None, logs={"loss": 0.5})
    assert [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()] == [{"step": 2, "epoch": 1.0, "loss": 0.5}]


def test_logged_accuracy_counts_every_query_of_an_accumulation_window(tiny_qwen3, mined_file, tmp_path):
    """10 rows, batches of 4, 3 accumulation steps: the Trainer fetches the window [4, 4, 2] at once, so the
    dataloader has ended while the first two batches run; every one of the 10 queries must still be counted
    (accelerate's gather_for_metrics would cut those batches to the remainder, 2, and count 6)."""
    cfg = make_config(tiny_qwen3, mined_file, tmp_path, training={"gradient_accumulation_steps": 3,
                                                                  "logging_steps": 100})
    trainer, rows = build_trainer(cfg)
    trainer.train_dataset = rows[:10]
    trainer.train()
    counted = trainer._metrics["train"]
    assert sum(counted["queries"]) == 10 and counted["queries"] == [4.0, 4.0, 2.0]
    assert 0 <= sum(counted["correct"]) <= 10
