"""Config loading: sections, defaults, overrides, and one clear error per bad config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfemb.training.config import TRAINING_DEFAULTS, load_config, parse_override
from hfemb.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, cfg) -> Path:
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    return p


BASE = {"model": {"name_or_path": "some/model"}, "data": {"train_file": "train.jsonl"}, "training": {"output_dir": "out"}}


@pytest.mark.parametrize("name", ["lora", "qlora", "full", "lora_8b", "demo"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.json")
    assert cfg.model.finetune_type in ("lora", "qlora", "full")
    assert cfg.training["output_dir"]


def test_reference_recipe_in_lora_json():
    cfg = load_config(REPO / "configs" / "lora.json")
    assert cfg.model.name_or_path == "Qwen/Qwen3-Embedding-0.6B"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    t = cfg.training
    assert (t["learning_rate"], t["per_device_train_batch_size"], t["gradient_accumulation_steps"]) == (1e-4, 16, 2)
    assert (t["num_train_epochs"], t["warmup_ratio"], t["bf16"], t["gradient_checkpointing"]) == (3, 0.1, True, True)
    assert cfg.data.num_negatives == 3 and cfg.loss.temperature is None  # auto: by mining mode


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["training.learning_rate=2e-5", "data.num_negatives=7",
                                              "loss.in_batch_negatives=false", "lora.target_modules=[\"q_proj\"]"])
    assert cfg.training["learning_rate"] == 2e-5
    assert cfg.training["lr_scheduler_type"] == TRAINING_DEFAULTS["lr_scheduler_type"] == "cosine"
    assert cfg.data.num_negatives == 7 and cfg.loss.in_batch_negatives is False
    assert cfg.lora.target_modules == ["q_proj"]
    assert parse_override("model.query_instruction=Given a query") == ("model", "query_instruction", "Given a query")


@pytest.mark.parametrize("patch, message", [
    ({"model": {"name_or_path": "m", "finetune": "lora"}}, "unknown key(s) 'finetune' in section 'model'; valid keys: append_eos"),
    ({"modle": {}}, "unknown key(s) 'modle' in section '<top level>'"),
    ({"training": {"output_dir": "o", "learnin_rate": 1}}, "unknown key(s) 'learnin_rate' in section 'training'"),
    ({"model": {"name_or_path": "m", "finetune_type": "qlorax"}}, "'model.finetune_type' must be one of lora, qlora, full"),
    ({"data": {"train_file": "t", "num_negatives": "3"}}, "'data.num_negatives' must be a whole number, got '3'"),
    ({"loss": {"in_batch_negatives": "yes"}}, "'loss.in_batch_negatives' must be true or false"),
    ({"loss": {"temperature": 0}}, "'loss.temperature' must be > 0"),
    ({"loss": {"doc_to_query_weight": -1}}, "'loss.doc_to_query_weight' must be >= 0, got -1"),
    ({"loss": {"doc_to_query_weight": float("nan")}}, "'loss.doc_to_query_weight' must be >= 0, got nan"),
    ({"loss": {"doc_to_query_weight": 1, "in_batch_negatives": False}},
     "'loss.doc_to_query_weight' needs 'loss.in_batch_negatives'"),
    ({"data": {"train_file": "t", "eval_file": "e", "eval_ratio": 0.1}}, "give 'data.eval_file' or 'data.eval_ratio', not both"),
    ({"data": {"train_file": "t", "eval_ratio": 1.5}}, "'data.eval_ratio' must be a number in [0, 1), got 1.5"),
    ({"training": {"output_dir": "o", "learning_rate": "2e-5"}}, "'training.learning_rate' must be a number, got '2e-5'"),
    ({"model": {"name_or_path": "m", "truncate_dim": "64"}}, "'model.truncate_dim' must be a whole number or null, got '64'"),
    ({"lora": {"target_modules": 5}}, "'lora.target_modules' must be a list of strings or a string or null, got 5"),
    ({"lora": {"dropout": 1.5}}, "'lora.dropout' must be in [0, 1), got 1.5"),
    ({"lora": {"bias": "some"}}, "'lora.bias' must be none, all or lora_only"),
    ({"mining": {"hard_top_k": "10"}}, "'mining.hard_top_k' must be a whole number, got '10'"),
    ({"training": {"output_dir": "o", "per_device_train_batch_size": 16.5}},
     "'training.per_device_train_batch_size' must be a whole number, got 16.5"),
    ({"training": {"output_dir": "o", "gradient_accumulation_steps": 0}}, "'training.gradient_accumulation_steps' must be >= 1"),
    ({"training": {"output_dir": "o", "learning_rate": -1}}, "'training.learning_rate' must be > 0.0, got -1"),
    ({"training": {"output_dir": "o", "bf16": "true"}}, "'training.bf16' must be true or false, got 'true'"),
    ({"training": {"output_dir": ["a"]}}, "'training.output_dir' must be a string or null, got ['a']"),
    ({"training": {"output_dir": "o", "remove_unused_columns": True}}, "'training.remove_unused_columns' must stay false"),
    ({"data": {"train_file": ""}}, "'data.train_file' is required"),
])
def test_bad_configs(tmp_path, patch, message):
    raw = {k: dict(v) for k, v in BASE.items()}
    for section, values in patch.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw))
    assert message in str(err.value)
    assert str(tmp_path / "cfg.json") in str(err.value)


def test_invalid_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "model": {\n    "name_or_path": "x",\n  }\n}')
    with pytest.raises(ConfigError, match=r"bad\.json:4: invalid JSON"):
        load_config(p)


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(write(tmp_path, BASE), ["learning_rate=1"])


def test_training_arguments_translation(tmp_path):
    from hfemb.training.run_setup import training_arguments

    cfg = load_config(write(tmp_path, {**BASE, "training": {"output_dir": str(tmp_path / "o"), "warmup_ratio": 0.1,
                                                             "gradient_checkpointing": True, "group_by_length": True,
                                                             "report_to": "none"}}))
    args = training_arguments(cfg, has_eval=True)
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(1000) == 100
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.train_sampling_strategy == "group_by_length"
    assert args.remove_unused_columns is False
    assert args.lr_scheduler_type == "cosine" and args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"


def test_qlora_on_cpu_stops_at_start(tmp_path):
    import torch

    from hfemb.errors import HfembError
    from hfemb.training.run_setup import check_hardware

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = load_config(write(tmp_path, {**BASE, "model": {"name_or_path": "m", "finetune_type": "qlora"}}))
    with pytest.raises(HfembError, match="'qlora' needs a CUDA GPU"):
        check_hardware(cfg)


def test_eval_file_override_with_eval_ratio_null_or_zero(tmp_path):
    """A config with eval_ratio (e.g. configs/multi_dataset.json): a held-out file on the command line needs it switched off."""
    raw = {k: dict(v) for k, v in BASE.items()}
    raw["data"] = {**raw.get("data", {}), "eval_ratio": 0.1}
    path = write(tmp_path, raw)
    for off in ("null", "0"):
        cfg = load_config(path, ["data.eval_file=dev.jsonl", f"data.eval_ratio={off}"])
        assert cfg.data.eval_file == "dev.jsonl" and cfg.data.eval_ratio == 0.0


def test_training_section_null_or_list_is_an_error(tmp_path):
    for bad in (None, []):
        raw = {**{k: dict(v) for k, v in BASE.items()}, "training": bad}
        with pytest.raises(ConfigError, match="section 'training' must be an object"):
            load_config(write(tmp_path, raw))
