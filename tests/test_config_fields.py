"""hfemb.config_fields: a config dataclass's new field is checked from its annotation, with no extra code."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from hfemb.config_fields import check_annotated, check_section
from hfemb.errors import ConfigError
from hfemb.training.config import load_config


@dataclass
class NewSection:
    padding_free: bool = False
    merged_dtype: Literal["float32", "bfloat16"] | None = None
    matryoshka_dims: list[int] | None = None
    distill_weight: float = 0.0
    train_files: list[str] = field(default_factory=list)


@pytest.mark.parametrize("key, value, message", [
    ("padding_free", 1, "'new.padding_free' must be true or false, got 1"),
    ("merged_dtype", "fp8", "'new.merged_dtype' must be one of float32, bfloat16 or null, got 'fp8'"),
    ("matryoshka_dims", [64, "32"], "'new.matryoshka_dims' must be a list of whole numbers or null, got [64, '32']"),
    ("distill_weight", "0.5", "'new.distill_weight' must be a number, got '0.5'"),
    ("train_files", "a.jsonl", "'new.train_files' must be a list of strings, got 'a.jsonl'"),
    ("trainfiles", [], "unknown key(s) 'trainfiles' in section 'new'; valid keys: distill_weight, matryoshka_dims, "
                       "merged_dtype, padding_free, train_files"),
])
def test_new_fields_are_checked_from_their_annotations(key, value, message):
    with pytest.raises(ConfigError) as err:
        check_section(NewSection, "new", {key: value}, "cfg.json")
    assert str(err.value) == f"cfg.json: {message}"


def test_good_values_pass_and_ints_become_floats_where_only_a_float_fits():
    got = check_section(NewSection, "new", {"padding_free": True, "merged_dtype": None, "matryoshka_dims": [64, 32],
                                            "distill_weight": 1, "train_files": ["a", "b"]}, "cfg.json")
    assert got == {"padding_free": True, "merged_dtype": None, "matryoshka_dims": [64, 32], "distill_weight": 1.0,
                   "train_files": ["a", "b"]}
    assert type(got["distill_weight"]) is float
    assert check_annotated("", "split_dev", 0.5, "float | None", "e.json") == 0.5
    with pytest.raises(ConfigError, match=r"^e\.json: 'split_dev' must be a number or null, got 'x'$"):
        check_annotated("", "split_dev", "x", "float | None", "e.json")


def test_training_section_checks_hfemb_fields_aliases_and_enums(tmp_path):
    base = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}}
    cases = [({"grad_cache_mini_batch": "8"}, "'training.grad_cache_mini_batch' must be a whole number or null, got '8'"),
             ({"warmup_ratio": "0.1"}, "'training.warmup_ratio' must be a number, got '0.1'"),
             ({"group_by_length": "yes"}, "'training.group_by_length' must be true or false, got 'yes'"),
             ({"lr_scheduler_typ": "cosine"}, "valid keys: accelerator_config, activation_checkpointing"),
             ({"save_total_limit": 2.5}, "'training.save_total_limit' must be a whole number or null, got 2.5")]
    for patch, message in cases:
        path = tmp_path / "c.json"
        path.write_text(json.dumps({**base, "training": {"output_dir": "o", **patch}}))
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert message in str(err.value) and str(path) in str(err.value)
    path.write_text(json.dumps({**base, "training": {"output_dir": "o"}}))
    cfg = load_config(path, ["training.grad_cache_mini_batch=4", "training.eval_strategy=steps"])
    assert cfg.training["grad_cache_mini_batch"] == 4 and cfg.training["eval_strategy"] == "steps"
