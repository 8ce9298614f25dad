"""GradCache on the tiny Qwen3: same loss and parameter gradients as the plain path (full fine-tuning, LoRA,
activation checkpointing, gradient accumulation), dropout masks replayed per mini-batch, config checks."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from hfemb.training.arguments import EmbeddingTrainingArguments
from hfemb.training.config import config_from_dict
from hfemb.data.formats import read_records
from hfemb.errors import ConfigError

B, N = 4, 2  # 4 queries, 1 positive + 2 negatives each: 12 documents


@pytest.fixture(scope="module")
def rows(zh_sample_csv):
    recs = read_records(str(zh_sample_csv)).records[:16]
    return [{"query": r.query, "positive": r.positives[0],
             "negatives": [recs[(i + 5) % 16].positives[0], recs[(i + 11) % 16].positives[0]]}
            for i, r in enumerate(recs)]


def make_trainer(model_path, tmp_path, rows, finetune="full", dropout=0.0, loss=None, training=None):
    from hfemb.training.collator import MultiNegCollator
    from hfemb.training.run_setup import build_model, training_arguments
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    cfg = config_from_dict({
        "model": {"name_or_path": model_path, "finetune_type": finetune, "torch_dtype": "float32"},
        "data": {"train_file": "unused.jsonl", "num_negatives": N},
        "lora": {"r": 4, "alpha": 8, "dropout": dropout},
        "loss": loss or {},
        "training": {"output_dir": str(tmp_path), "report_to": "none", "save_strategy": "no", "seed": 0,
                     "per_device_train_batch_size": B, "disable_tqdm": True, "dataloader_pin_memory": False,
                     **(training or {})},
    })
    torch.manual_seed(0)
    model = build_model(cfg)
    if finetune == "lora":  # lora_B starts at zero: move it so gradients reach lora_A and the base path differs
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    trainer = MultiNegEmbeddingTrainer(
        model=model, args=training_arguments(cfg, has_eval=False), train_dataset=rows, loss_config=cfg.loss,
        data_collator=MultiNegCollator(model, query_max_len=32, passage_max_len=48, num_negatives=N),
        grad_cache_mini_batch=cfg.training.get("grad_cache_mini_batch"))
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; training_step reads it
    return trainer


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def step(trainer, batch, mini_batch, seed=0):
    trainer.model.zero_grad(set_to_none=True)
    trainer.grad_cache_mini_batch = mini_batch
    torch.manual_seed(seed)
    loss = trainer.training_step(trainer.model, dict(batch))
    return float(loss), grads(trainer.model)


def assert_same_grads(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


def reference_with_graphs(trainer, batch, mini_batch, seed=0):
    """The plain loss and gradient with the batch embedded in GradCache's mini-batches, all graphs kept:
    from the same seed, the same dropout masks as GradCache's no-grad pass."""
    from hfemb.training.grad_cache import mini_batches

    model = trainer.model
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(seed)
    q = torch.cat([model(i, m) for i, m in mini_batches(batch["query_input_ids"], batch["query_attention_mask"],
                                                         mini_batch)])
    d = torch.cat([model(i, m) for i, m in mini_batches(batch["doc_input_ids"], batch["doc_attention_mask"],
                                                         mini_batch)])
    out = trainer._loss(q, d, batch)
    out.loss.backward()
    return float(out.loss), grads(model)


def test_full_finetuning_same_loss_and_gradients_as_plain(tiny_qwen3, tmp_path, rows):
    trainer = make_trainer(tiny_qwen3, tmp_path, rows)
    batch = trainer.data_collator(rows[:B])
    plain_loss, plain = step(trainer, batch, None)
    for mini_batch in (2, 5):
        loss, cached = step(trainer, batch, mini_batch)
        assert loss == pytest.approx(plain_loss, abs=1e-5)
        assert_same_grads(cached, plain)
    assert any(g.abs().max() > 1e-3 for g in plain.values())
    # the logged accuracy counts every query once per step, whichever path
    assert sum(trainer._metrics["train"]["queries"]) == 3 * B


def test_lora_dropout_masks_are_replayed(tiny_qwen3, tmp_path, rows):
    """LoRA dropout 0.3: GradCache equals the plain computation with the same masks (the mini-batches'
    forward passes from the same seed, graphs kept); without replaying the RNG it would not."""
    trainer = make_trainer(tiny_qwen3, tmp_path, rows, finetune="lora", dropout=0.3)
    batch = trainer.data_collator(rows[:B])
    ref_loss, ref = reference_with_graphs(trainer, batch, mini_batch=3)
    loss, cached = step(trainer, batch, 3)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert_same_grads(cached, ref)
    assert all("lora_" in n for n in cached)
    # one mini-batch holding everything draws the masks exactly as the plain path
    plain_loss, plain = step(trainer, batch, None, seed=1)
    whole_loss, whole = step(trainer, batch, 100, seed=1)
    assert whole_loss == pytest.approx(plain_loss, abs=1e-5)
    assert_same_grads(whole, plain)
    # the test has teeth: dropout is active and the replay is what makes the gradients match
    from hfemb.training import grad_cache

    original = grad_cache.RngState.replay
    grad_cache.RngState.replay = lambda self: nullcontext()
    try:
        _, unreplayed = step(trainer, batch, 3)
    finally:
        grad_cache.RngState.replay = original
    assert max(float((unreplayed[n] - ref[n]).abs().max()) for n in ref) > 1e-3


def test_lora_with_activation_checkpointing(tiny_qwen3, tmp_path, rows):
    trainer = make_trainer(tiny_qwen3, tmp_path, rows, finetune="lora", dropout=0.2)
    batch = trainer.data_collator(rows[:B])
    ref_loss, ref = reference_with_graphs(trainer, batch, mini_batch=4)
    trainer.model.gradient_checkpointing_enable()
    qwen3 = trainer.model.backbone.base_model.model
    assert all(layer.gradient_checkpointing for layer in qwen3.layers)
    loss, cached = step(trainer, batch, 4)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert_same_grads(cached, ref)


def test_trained_weights_match_with_accumulation(tiny_qwen3, tmp_path, rows):
    """Two optimizer steps of SGD, batch 2 x accumulation 2, in-batch negatives and false-negative masking:
    GradCache (mini-batch 2) ends at the same weights as the plain path."""
    common = {"max_steps": 2, "learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant",
              "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 0.0, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 2, "logging_steps": 1}
    final, logged = [], []
    for mini_batch in (None, 2):
        trainer = make_trainer(tiny_qwen3, tmp_path / str(mini_batch), rows, loss={"mask_false_negatives": True},
                               training={**common, "grad_cache_mini_batch": mini_batch})
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
        final.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        logged.append([(h["loss"], h["accuracy"]) for h in trainer.state.log_history if "loss" in h])
    assert max(float((final[0][n] - p).abs().max()) for n, p in initial.items()) > 1e-3
    for name in final[0]:
        torch.testing.assert_close(final[1][name], final[0][name], atol=1e-5, rtol=1e-4, msg=name)
    assert len(logged[0]) == 2
    for (loss_a, acc_a), (loss_b, acc_b) in zip(*logged):
        assert loss_b == pytest.approx(loss_a, abs=1e-4) and acc_a == acc_b


def test_rng_state_replays_cpu_dropout():
    from hfemb.training.grad_cache import RngState

    state = RngState(torch.device("cpu"))
    first = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    torch.manual_seed(123)
    reference_next = torch.rand(3)
    torch.manual_seed(123)
    with state.replay():
        again = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    assert torch.equal(first, again) and 300 < int((first == 0).sum()) < 700
    assert torch.equal(torch.rand(3), reference_next)  # the replay left the global random state alone


def test_mini_batches_trim_all_padding_columns():
    from hfemb.training.grad_cache import mini_batches

    ids = torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9], [0, 0, 0, 4]])
    mask = (ids != 0).long()
    chunks = mini_batches(ids, mask, 2)
    assert [c[0].tolist() for c in chunks] == [[[0, 5, 6], [7, 8, 9]], [[4]]]
    assert [c[1].tolist() for c in chunks] == [[[0, 1, 1], [1, 1, 1]], [[1]]]
    with pytest.raises(ValueError):
        mini_batches(ids, mask, 0)


@pytest.mark.parametrize("value", [-1, 2.5, "8", True])
def test_config_rejects_bad_mini_batch(value, tmp_path):
    raw = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"},
           "training": {"output_dir": str(tmp_path), "grad_cache_mini_batch": value}}
    with pytest.raises(ConfigError, match="grad_cache_mini_batch"):
        config_from_dict(raw)


def test_config_accepts_mini_batch_and_passes_it_in_the_training_arguments(tmp_path):
    from hfemb.training.run_setup import training_arguments

    raw = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"},
           "training": {"output_dir": str(tmp_path), "grad_cache_mini_batch": 8, "report_to": "none"}}
    cfg = config_from_dict(json.loads(json.dumps(raw)))
    assert cfg.training["grad_cache_mini_batch"] == 8
    args = training_arguments(cfg, has_eval=False)
    assert isinstance(args, EmbeddingTrainingArguments) and args.grad_cache_mini_batch == 8
    raw["training"]["deepspeed"] = "configs/deepspeed/zero2.json"
    with pytest.raises(ConfigError, match="DeepSpeed"):
        config_from_dict(raw)
