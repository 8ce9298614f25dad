"""Merging a LoRA adapter trained on a bf16 base (issue 13, item 1): the merge runs in fp32 and ``merged/``
keeps fp32 by default, so it embeds like the adapter model on the bf16-rounded base; the recorded merge error
equals a recomputation; a bf16 ``merged/`` loses more than 1 % and says so. The oracle is the adapter applied
to the bf16 base upcast to fp32 (peft's own LoRA forward, no merge)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hfemb.modeling.loading import load_embedding_model
from hfemb.training.merging import delta_lost_in, merge_adapter, merge_error

TEXTS = ["高血压患者日常饮食需要注意什么？", "头痛怎么办", "What should I eat with high blood pressure?",
         "低盐饮食，多吃蔬菜水果。"]


@pytest.fixture(scope="module")
def bf16_adapter(tmp_path_factory, tiny_qwen3):
    """A LoRA adapter trained (here: set) on the tiny Qwen3 loaded in bf16, whose delta is ~1 % of each
    weight's norm, as after a real run."""
    from peft import LoraConfig, get_peft_model

    model = load_embedding_model(tiny_qwen3, torch_dtype="bfloat16")
    model.backbone = get_peft_model(model.backbone, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], task_type="FEATURE_EXTRACTION"))
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, LoraLayer):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                assert a.dtype == b.dtype == torch.float32  # peft keeps adapters in fp32 on a bf16 base
                b.copy_(torch.randn(b.shape, generator=gen))
                delta = module.get_delta_weight("default").float()
                b.mul_(0.01 * module.get_base_layer().weight.float().norm() / delta.norm())
    path = tmp_path_factory.mktemp("bf16_adapter") / "adapter"
    model.save_pretrained(path)
    return path


def _reference(tiny_qwen3, adapter_dir):
    """fp32 embeddings of the adapter model and of the base, both on the bf16-rounded base weights."""
    from peft import PeftModel

    model = load_embedding_model(tiny_qwen3, torch_dtype="bfloat16")
    model.backbone = PeftModel.from_pretrained(model.backbone.float(), str(adapter_dir))
    emb = lambda: np.concatenate([model.encode(TEXTS, is_query=True), model.encode(TEXTS, is_query=False)])  # noqa: E731
    adapter = emb()
    with model.backbone.disable_adapter():
        base = emb()
    return adapter, base


def _merged(folder):
    model = load_embedding_model(str(folder), torch_dtype="float32")
    return np.concatenate([model.encode(TEXTS, is_query=True), model.encode(TEXTS, is_query=False)])


def test_default_merge_of_a_bf16_base_keeps_the_adapter_exactly(bf16_adapter, tiny_qwen3, tmp_path):
    out = tmp_path / "merged"
    report = merge_adapter(bf16_adapter, out, base_dtype="bfloat16", texts=TEXTS)
    assert report["merged_dtype"] == "float32" and report["base_dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not (out / "adapter_config.json").exists()
    adapter, base = _reference(tiny_qwen3, bf16_adapter)
    merged = _merged(out)
    shift = np.linalg.norm(adapter - base, axis=1).mean()
    assert shift > 1e-3  # the adapter moves the embeddings
    np.testing.assert_allclose(merged, adapter, atol=2e-6)  # fp32 precision
    expected = merge_error(torch.from_numpy(merged), torch.from_numpy(adapter), torch.from_numpy(base))
    assert report["merge_error"] == pytest.approx(expected["merge_error"], abs=1e-4)
    assert report["merge_error"] < 1e-3 and report["adapter_shift"] == pytest.approx(shift, rel=1e-4)
    assert report["delta_lost_in_base_dtype"] > 0.01  # why auto chose fp32


def test_bf16_merged_model_loses_part_of_the_adapter_and_warns(bf16_adapter, tiny_qwen3, tmp_path, caplog):
    """What the code did before: W + delta stored in bf16. The recorded error matches a recomputation from the
    stored weights and is above 1 %, with a warning."""
    out = tmp_path / "merged_bf16"
    with caplog.at_level(logging.WARNING, logger="hfemb.training.merging"):
        report = merge_adapter(bf16_adapter, out, base_dtype="bfloat16", merged_dtype="bfloat16", texts=TEXTS)
    assert report["merged_dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    adapter, base = _reference(tiny_qwen3, bf16_adapter)
    merged = _merged(out)  # bf16 values, computed in fp32
    expected = merge_error(torch.from_numpy(merged), torch.from_numpy(adapter), torch.from_numpy(base))
    assert report["merge_error"] == pytest.approx(expected["merge_error"], rel=1e-3)
    assert report["merge_error"] > 0.01
    assert "loses" in caplog.text and "bfloat16" in caplog.text


def test_delta_lost_in_by_hand():
    """One LoRA layer: ||bf16(W + BA*s) - (W + BA*s)|| / ||BA*s||, computed by hand."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    peft = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.01)
    w = layer.base_layer.weight.detach()
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * 2.0
    merged = w + delta
    expected = float((merged.to(torch.bfloat16).float() - merged).norm() / delta.norm())
    assert delta_lost_in(peft, torch.bfloat16) == pytest.approx(expected, rel=1e-5)
    assert delta_lost_in(peft, torch.float32) == 0.0


def test_merge_refuses_a_bad_dtype(bf16_adapter, tmp_path):
    from hfemb.errors import HfembError

    with pytest.raises(HfembError, match="dtype must be one of"):
        merge_adapter(bf16_adapter, tmp_path / "x", merged_dtype="int8")
    assert not (tmp_path / "x").exists()


def test_bf16_lora_training_writes_an_exact_merged_model(tiny_qwen3, zh_sample_csv, tmp_path):
    """`run_training` with model.torch_dtype=bfloat16 (the outside check of issue 13): merged/ embeds like the
    adapter on that bf16 base to within 5 % of the adapter's shift (it was ~16 %), and train_summary.json
    records the merge."""
    from hfemb.data.formats import read_records
    from hfemb.training.config import config_from_dict
    from hfemb.training.runner import run_training

    recs = read_records(str(zh_sample_csv)).records[:16]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": r.query, "positive": r.positives[0],
                                         "negative": [recs[(i + 5) % 16].positives[0]]}, ensure_ascii=False) + "\n"
                             for i, r in enumerate(recs)), encoding="utf-8")
    out = tmp_path / "run"
    cfg = config_from_dict({
        "model": {"name_or_path": tiny_qwen3, "torch_dtype": "bfloat16"},
        "data": {"train_file": str(train), "num_negatives": 1, "query_max_len": 32, "passage_max_len": 48},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 8, "max_steps": 4, "learning_rate": 5e-3,
                     "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1,
                     "dataloader_pin_memory": False}})
    summary = run_training(cfg)
    merge = json.loads((out / "train_summary.json").read_text())["merge"]
    assert merge == summary["merge"] and merge["merged_dtype"] == "float32" and merge["base_dtype"] == "bfloat16"
    adapter, base = _reference(tiny_qwen3, out / "adapter")
    merged = _merged(out / "merged")
    expected = merge_error(torch.from_numpy(merged), torch.from_numpy(adapter), torch.from_numpy(base))
    assert expected["adapter_shift"] > 1e-3 and expected["merge_error"] < 0.05
    assert merge["merge_error"] < 0.05 and merge["texts"] == 8


def test_trainer_is_freed_before_merging(tiny_qwen3, tmp_path, monkeypatch):
    """The CPU merge runs with the trainer, its optimizer and the trained model gone (their GPU memory free):
    no MultiNegEmbeddingTrainer is alive while `merge_outputs` runs (oracle: the garbage collector)."""
    import gc

    import hfemb.training.runner as runner
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import make_config

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": f"question number {i}", "positive": f"answer text {i}",
                                         "negative": [f"other text {i + 1}", f"more text {i + 2}"]}) + "\n"
                             for i in range(8)))
    alive = []
    merge = runner.merge_outputs

    def spy(*args, **kwargs):
        gc.collect()
        alive.extend(type(o).__name__ for o in gc.get_objects() if isinstance(o, MultiNegEmbeddingTrainer))
        return merge(*args, **kwargs)

    monkeypatch.setattr(runner, "merge_outputs", spy)
    runner.run_training(make_config(tiny_qwen3, str(train), tmp_path / "out", training={"max_steps": 1}))
    assert (tmp_path / "out" / "merged" / "config.json").is_file() and alive == []
