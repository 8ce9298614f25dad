"""Issue 13 items 8-10, 12, 13 on CPU: fp32 trainable weights under mixed precision on a half-precision base,
QLoRA + ZeRO-3 refused, GradCache + nn.DataParallel refused, DDP's find_unused_parameters decided on the model
(no search for Qwen3, a search for BERT's unused pooler), buffers not broadcast, and a warning for GradCache
with gradient checkpointing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hfemb.errors import ConfigError
from hfemb.training.config import config_from_dict

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[2]


def _cfg(model, tmp_path, *, finetune="lora", dtype="float32", lora=None, **training):
    return config_from_dict({"model": {"name_or_path": model, "finetune_type": finetune, "torch_dtype": dtype},
                             "data": {"train_file": "t.jsonl"}, "lora": {"r": 4, "alpha": 8, **(lora or {})},
                             "training": {"output_dir": str(tmp_path), "report_to": "none", **training}})


def _qwen3_with_biases(tiny_qwen3, tmp_path) -> str:
    """The tiny Qwen3 with attention biases (``attention_bias``; the biases start random)."""
    import json
    import shutil

    folder = tmp_path / "tiny-qwen3-bias"
    shutil.copytree(tiny_qwen3, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    return str(folder)


def test_mixed_precision_lora_biases_train_in_fp32(tiny_qwen3, tmp_path):
    """A bf16 base with biases, lora.bias=all and training.bf16: every trainable weight is fp32 (peft left the
    base's biases in bf16; with fp16 GradScaler then raises "Attempting to unscale FP16 gradients"), and a
    forward/backward under autocast gives fp32 gradients."""
    from hfemb.training.run_setup import build_model

    path = _qwen3_with_biases(tiny_qwen3, tmp_path)
    model = build_model(_cfg(path, tmp_path, dtype="bfloat16", lora={"bias": "all"}, bf16=True, use_cpu=True))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    biases = [n for n in trainable if n.endswith(".bias")]
    assert len(biases) == 2 * 4 and {p.dtype for p in trainable.values()} == {torch.float32}  # 2 layers x q,k,v,o
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}  # the base stays bf16
    enc = model.tokenize(["高血压吃什么", "a longer english sentence"], is_query=False, max_length=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(enc["input_ids"], enc["attention_mask"]).sum().backward()
    grads = {n: p.grad for n, p in trainable.items() if p.grad is not None}
    assert set(biases) <= set(grads) and {g.dtype for g in grads.values()} == {torch.float32}
    # without mixed precision nothing is cast (there is no autocast to reconcile bf16 weights and fp32 biases)
    plain = build_model(_cfg(path, tmp_path, dtype="bfloat16", lora={"bias": "all"}))
    assert {p.dtype for n, p in plain.named_parameters() if n.endswith(".bias")} == {torch.bfloat16}


def test_qlora_with_zero3_is_refused(tmp_path):
    zero3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
    with pytest.raises(ConfigError, match="QLoRA .* ZeRO-3 is not supported.*zero2.json"):
        _cfg("m", tmp_path, finetune="qlora", deepspeed=zero3)
    _cfg("m", tmp_path, finetune="qlora", deepspeed=str(REPO / "configs" / "deepspeed" / "zero2.json"))
    _cfg("m", tmp_path, finetune="lora", deepspeed=zero3)
    with pytest.raises(ConfigError, match="training.deepspeed"):
        _cfg("m", tmp_path, finetune="qlora", deepspeed=str(tmp_path / "missing.json"))


def test_grad_cache_refuses_data_parallel():
    from transformers.training_args import ParallelMode

    from hfemb.training.trainer import check_grad_cache_parallelism

    with pytest.raises(ConfigError, match="nn.DataParallel .*torchrun"):
        check_grad_cache_parallelism(SimpleNamespace(n_gpu=2, parallel_mode=ParallelMode.NOT_DISTRIBUTED))
    check_grad_cache_parallelism(SimpleNamespace(n_gpu=1, parallel_mode=ParallelMode.NOT_DISTRIBUTED))
    check_grad_cache_parallelism(SimpleNamespace(n_gpu=1, parallel_mode=ParallelMode.DISTRIBUTED))


def test_unused_parameters_are_found_by_a_probe(tiny_qwen3, minilm, tmp_path):
    """Qwen3 with LoRA or fully trained uses every trainable weight (DDP needs no search); full BERT leaves
    its pooler (not used by mean pooling) without gradient. Oracle: the parameter names autograd reaches."""
    from hfemb.training.run_setup import build_model, has_unused_trainable_parameters

    assert not has_unused_trainable_parameters(build_model(_cfg(tiny_qwen3, tmp_path)))
    assert not has_unused_trainable_parameters(build_model(_cfg(tiny_qwen3, tmp_path, finetune="full")))
    bert = build_model(_cfg(minilm, tmp_path, finetune="full"))
    assert has_unused_trainable_parameters(bert)
    enc = bert.tokenize(["probe text"], is_query=False, max_length=8)
    bert(enc["input_ids"], enc["attention_mask"]).sum().backward()
    assert {n for n, p in bert.named_parameters() if p.grad is None} == {"backbone.pooler.dense.weight",
                                                                         "backbone.pooler.dense.bias"}


def test_ddp_defaults_and_grad_cache_checkpointing_warning(tmp_path, caplog):
    from hfemb.training.run_setup import training_arguments

    args = training_arguments(_cfg("m", tmp_path), has_eval=False)
    assert args.ddp_broadcast_buffers is False and args.ddp_find_unused_parameters is None  # decided in run_training
    assert training_arguments(_cfg("m", tmp_path, ddp_broadcast_buffers=True), has_eval=False).ddp_broadcast_buffers
    with caplog.at_level(logging.WARNING, logger="hfemb.training.run_setup"):
        training_arguments(_cfg("m", tmp_path, grad_cache_mini_batch=4, gradient_checkpointing=True), has_eval=False)
    assert "three forward passes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hfemb.training.run_setup"):
        training_arguments(_cfg("m", tmp_path, grad_cache_mini_batch=4), has_eval=False)
        training_arguments(_cfg("m", tmp_path, gradient_checkpointing=True), has_eval=False)
    assert "three forward passes" not in caplog.text


def test_eval_ratio_keeps_a_training_query_and_bad_top_level_with_override(tmp_path):
    from operator import itemgetter

    from hfemb.data.splits import split_by_query
    from hfemb.errors import HfembError
    from hfemb.training.config import load_config

    one = [{"query": "q", "positive": f"p{i}", "negatives": []} for i in range(3)]
    with pytest.raises(HfembError, match="cannot split 1 distinct query"):
        split_by_query(one, 0.5, seed=0, query=itemgetter("query"))  # nothing would be left to train on
    two = one + [{"query": "r", "positive": "x", "negatives": []}]
    held, train = split_by_query(two, 0.9, seed=0, query=itemgetter("query"))
    assert len({r["query"] for r in train}) == 1 and len({r["query"] for r in held}) == 1
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_config(path, ["training.learning_rate=1e-4"])


def test_shipped_false_negative_margins_can_fire():
    """Cosine similarities lie in [-1, 1]: a margin of 2 or more above the positive can never be exceeded."""
    import json

    for path in (REPO / "configs").glob("*.json"):
        loss = json.loads(path.read_text()).get("loss") or {}
        if loss.get("mask_false_negatives"):
            assert loss.get("false_negative_margin", 0.1) < 2.0, path
