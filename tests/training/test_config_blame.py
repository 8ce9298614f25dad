"""Issue 17: errors caused by a command-line override name the override; hfemb's own defaults for saving,
evaluating and keeping the best model agree with whatever the user set."""

from __future__ import annotations

import json

import pytest

from hfemb.errors import ConfigError
from hfemb.training.config import load_config

BASE = {"model": {"name_or_path": "some/model"}, "data": {"train_file": "train.jsonl"},
        "training": {"output_dir": "out", "report_to": "none"}}


def write(tmp_path, cfg):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("override, message", [
    ("data.num_negatives=-1", "'data.num_negatives' must be >= 0"),
    ("model.pooling=max", "'model.pooling' must be last, mean or cls"),
    ("lora.r=\"8\"", "'lora.r' must be a whole number"),
    ("training.learnin_rate=1e-4", "unknown key(s) 'learnin_rate' in section 'training'"),
    ("data.colums=1", "unknown key(s) 'colums' in section 'data'"),
])
def test_an_override_error_names_the_override(tmp_path, override, message):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.learning_rate=2e-5", override])
    assert str(err.value).startswith(f"override {override!r}: ") and message in str(err.value)
    assert str(path) not in str(err.value)


def test_an_error_in_the_file_still_names_the_file(tmp_path):
    path = write(tmp_path, {**BASE, "model": {"name_or_path": "m", "pooling": "max"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.num_negatives=3"])
    assert str(err.value).startswith(f"{path}: 'model.pooling'")


@pytest.mark.parametrize("training, expected", [
    # the case: save_strategy=steps alone used to fail on load_best_model_at_end (which hfemb had set)
    ({"save_strategy": "steps", "save_steps": 5}, ("steps", "steps", 5, 5, True)),
    ({"eval_strategy": "steps", "eval_steps": 4}, ("steps", "steps", 4, 4, True)),
    ({"save_strategy": "epoch"}, ("epoch", "epoch", None, None, True)),
    ({}, ("epoch", "epoch", None, None, True)),
    # strategies the user made differ: no best model (the Trainer would refuse it), no error
    ({"eval_strategy": "steps", "eval_steps": 3, "save_strategy": "epoch"}, ("steps", "epoch", 3, None, False)),
    ({"eval_strategy": "steps", "eval_steps": 3, "save_steps": 5}, ("steps", "steps", 3, 5, False)),
    ({"eval_strategy": "steps", "eval_steps": 3, "save_steps": 6}, ("steps", "steps", 3, 6, True)),
])
def test_save_eval_and_best_model_defaults_agree(tmp_path, training, expected):
    from hfemb.training.run_setup import training_arguments

    cfg = load_config(write(tmp_path, {**BASE, "training": {**BASE["training"], "output_dir": str(tmp_path / "o"),
                                                            **training}}))
    args = training_arguments(cfg, has_eval=True)
    eval_strategy, save_strategy, eval_steps, save_steps, best = expected
    assert (str(args.eval_strategy.value), str(args.save_strategy.value)) == (eval_strategy, save_strategy)
    if eval_steps is not None:
        assert args.eval_steps == eval_steps
    if save_steps is not None:
        assert args.save_steps == save_steps
    assert args.load_best_model_at_end is best


def test_an_explicit_load_best_model_at_end_is_still_checked(tmp_path):
    from hfemb.training.run_setup import training_arguments

    cfg = load_config(write(tmp_path, {**BASE, "training": {**BASE["training"], "eval_strategy": "steps",
                                                            "save_strategy": "epoch", "load_best_model_at_end": True}}))
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        training_arguments(cfg, has_eval=True)


def test_a_training_arguments_error_from_an_override_names_it(tmp_path, capsys):
    """TrainingArguments' own check (load_best_model_at_end needs matching strategies) runs after the data is
    read and before the model loads (the model here does not exist)."""
    from hfemb.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}", "negative": [f"n{i}", f"m{i}"]}) + "\n"
                            for i in range(10)))
    path = write(tmp_path, {"model": {"name_or_path": str(tmp_path / "no-model")},
                            "data": {"train_file": str(data), "num_negatives": 2},
                            "training": {"output_dir": str(tmp_path / "out"), "report_to": "none"}})
    bad = "training.load_best_model_at_end=true"
    for eval_ratio in ("0.2", "0"):  # the Trainer's check; hfemb's own (no evaluation data)
        assert main(["train", str(path), f"data.eval_ratio={eval_ratio}", "training.eval_strategy=steps",
                     "training.save_strategy=epoch", bad]) == 2
        err = capsys.readouterr().err
        assert f"override {bad!r}: " in err and "load_best_model_at_end" in err and err.count("\n") == 1, err


def test_padding_free_values_are_checked_by_the_field_annotation(tmp_path):
    """model.padding_free is Literal['auto', true, false] | null: checked when the config loads, no torch needed."""
    path = write(tmp_path, BASE)
    for value, expected in (("true", True), ("false", False), ("auto", "auto"), ("null", None)):
        assert load_config(path, [f"model.padding_free={value}"]).model.padding_free == expected
    with pytest.raises(ConfigError, match="'model.padding_free' must be one of auto, True, False or null, got 'yes'"):
        load_config(path, ["model.padding_free=yes"])
