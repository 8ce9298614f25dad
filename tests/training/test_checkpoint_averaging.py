"""Checkpoint averaging (``training.average_checkpoints``): the exported ``merged/`` equals a hand-computed
per-tensor mean of the last k checkpoints (full fine-tuning: of their weights; LoRA: of W + s B A computed by
hand from each checkpoint's adapter file, which differs from the naive W + s avg(B) avg(A)); k=1 is the last
checkpoint; impossible configs stop before training with an error naming the field; the card says it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hfemb.errors import ConfigError
from hfemb.training.config import config_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import make_config, mined_file  # noqa: E402,F401 - the fixture is used by name


def _run(model, data, out, finetune, **training):
    from hfemb.training.runner import run_training

    settings = {"save_strategy": "steps", "save_steps": 1, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                "learning_rate": 2e-2, **training}
    return run_training(make_config(model, data, out, finetune=finetune, training=settings))


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(str(folder / "model.safetensors")).items()}


def test_full_finetuning_exports_the_mean_of_the_last_k_checkpoints(tiny_qwen3, mined_file, tmp_path):  # noqa: F811
    out = tmp_path / "full"
    summary = _run(tiny_qwen3, mined_file, out, "full", max_steps=3, average_checkpoints=2)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # limit raised to k
    record = json.loads((out / "train_summary.json").read_text())["checkpoint_averaging"]
    assert record == summary["checkpoint_averaging"] == json.loads((out / "merged" / "hfemb_averaging.json").read_text())
    assert record["k"] == 2 and record["steps"] == [2, 3] and record["checkpoints"] == ["checkpoint-2", "checkpoint-3"]
    c2, c3, merged = _weights(out / "checkpoint-2"), _weights(out / "checkpoint-3"), _weights(out / "merged")
    assert merged.keys() == c3.keys()
    moved = 0.0
    for name in c3:
        np.testing.assert_allclose(merged[name], (c2[name] + c3[name]) / 2, rtol=0, atol=1e-7)
        moved = max(moved, float(np.abs(merged[name] - c3[name]).max()))
    assert moved > 1e-4  # the average is not the last checkpoint
    assert not (out / "merged" / "adapter_config.json").exists()
    card = (out / "merged" / "README.md").read_text(encoding="utf-8")
    assert "## Weight merging" in card and "mean (in fp32) of the last 2 checkpoints" in card and "steps 2, 3" in card


def test_k_1_is_the_last_checkpoint(tiny_qwen3, mined_file, tmp_path):  # noqa: F811
    out = tmp_path / "k1"
    _run(tiny_qwen3, mined_file, out, "full", max_steps=2, average_checkpoints=1)
    last, merged = _weights(out / "checkpoint-2"), _weights(out / "merged")
    assert all(np.array_equal(merged[k], last[k]) for k in last)
    from hfemb.modeling.loading import load_embedding_model

    vec = load_embedding_model(str(out / "merged")).encode(["高血压"], is_query=True)
    assert np.isfinite(vec).all()


def _lora_delta_by_hand(adapter: dict[str, torch.Tensor], scale: float) -> dict[str, np.ndarray]:
    """{base weight name: s * B @ A} from an adapter file's keys (peft: base_model.model.<module>.lora_A.weight)."""
    out = {}
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        out[f"{module}.weight"] = scale * b.double().numpy() @ a.double().numpy()
    return out


def test_lora_averages_the_merged_weights_not_a_and_b(tiny_qwen3, mined_file, tmp_path):  # noqa: F811
    out = tmp_path / "lora"
    summary = _run(tiny_qwen3, mined_file, out, "lora", max_steps=3, average_checkpoints=3)
    assert summary["checkpoint_averaging"]["steps"] == [1, 2, 3] and "merge" not in summary
    base = _weights(Path(tiny_qwen3))
    scale = 8 / 4  # lora alpha / r of make_config
    adapters = [load_file(str(out / f"checkpoint-{i}" / "adapter_model.safetensors")) for i in (1, 2, 3)]
    deltas = [_lora_delta_by_hand(a, scale) for a in adapters]
    assert deltas[0] and deltas[0].keys() <= base.keys()
    merged = _weights(out / "merged")
    expected = {name: w + sum(d.get(name, 0.0) for d in deltas) / 3 for name, w in base.items()}
    assert merged.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(merged[name], expected[name], rtol=0, atol=2e-6)
    # the naive average of the factors, W + s avg(B) avg(A), is a different model: the test would catch it
    naive = _lora_delta_by_hand({k: sum(a[k] for a in adapters) / 3 for k in adapters[0]}, scale)
    gap = max(float(np.abs(base[n] + naive[n] - merged[n]).max()) for n in naive)
    assert gap > 100 * 2e-6, gap
    assert not (out / "merged" / "adapter_config.json").exists()
    assert json.loads((out / "merged" / "config.json").read_text())["dtype"] == "float32"
    card = (out / "merged" / "README.md").read_text(encoding="utf-8")
    assert "mean (in fp32) of the last 3 checkpoints" in card and "not of A and B" in card
    assert "## Weight merging" not in (out / "adapter" / "README.md").read_text(encoding="utf-8")


BASE = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}}


@pytest.mark.parametrize("training, words", [
    ({"average_checkpoints": 2, "save_strategy": "no"}, ["'training.save_strategy'", "saves no checkpoints"]),
    ({"average_checkpoints": 2, "save_strategy": "best"}, ["'training.save_strategy'"]),
    ({"average_checkpoints": 3, "save_total_limit": 2}, ["'training.save_total_limit' is 2"]),
    ({"average_checkpoints": 2, "load_best_model_at_end": True}, ["'training.load_best_model_at_end'"]),
    ({"average_checkpoints": 2, "deepspeed": {"zero_optimization": {"stage": 2}}}, ["'training.deepspeed'"]),
    ({"average_checkpoints": 3, "max_steps": 4, "save_strategy": "steps", "save_steps": 2},
     ["saves only 2 checkpoint(s)", "steps 2, 4"]),
    ({"average_checkpoints": -1}, ["whole number"]),
])
def test_config_errors_name_the_field(training, words):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, "training": {"output_dir": "o", **training}}, where="cfg.json")
    message = str(info.value)
    assert message.startswith("cfg.json: ") and "'training.average_checkpoints'" in message and "\n" not in message
    assert all(w in message for w in words), message


def test_defaults_make_room_for_k():
    """hfemb's default save_total_limit (2) is raised to k; an explicit one is kept; the plan of saves counts
    the last step (5 steps, every 2: steps 2, 4, 5)."""
    from hfemb.training.averaging import planned_save_steps
    from hfemb.training.run_setup import training_arguments

    cfg = config_from_dict({**BASE, "training": {"output_dir": "o", "average_checkpoints": 3, "max_steps": 5,
                                                 "save_strategy": "steps", "save_steps": 2}})
    assert cfg.training["save_total_limit"] == 3
    assert planned_save_steps(5, 2) == [2, 4, 5] and planned_save_steps(4, 2, after=2) == [4]
    args = training_arguments(cfg, has_eval=True)  # hfemb would turn load_best_model_at_end on: not with averaging
    assert args.load_best_model_at_end is False and args.save_total_limit == 3
    # no best checkpoint is tracked by default: the Trainer's rotation keeps it besides the newest ones, which
    # could delete one of the last k (the best at step 3 of 5 kept checkpoint-3 and -5, lost checkpoint-4)
    assert args.metric_for_best_model is None
    explicit = {"output_dir": "o", "average_checkpoints": 2, "metric_for_best_model": "eval_loss"}
    with pytest.raises(ConfigError, match="save_total_limit must be at least 3"):
        training_arguments(config_from_dict({**BASE, "training": {**explicit, "save_total_limit": 2}}), has_eval=True)
    assert training_arguments(config_from_dict({**BASE, "training": {**explicit, "save_total_limit": 3}}),
                              has_eval=True).save_total_limit == 3
    with pytest.raises(ConfigError, match="'training.average_checkpoints' is 2 but no checkpoints are saved"):
        training_arguments(config_from_dict({**BASE, "training": {"output_dir": "o", "average_checkpoints": 2,
                                                                  "eval_strategy": "no"}}), has_eval=True)


def test_too_few_saves_stop_before_the_first_step(tiny_qwen3, mined_file, tmp_path):  # noqa: F811
    """One epoch saved per epoch gives one checkpoint: the error comes once the Trainer knows its steps,
    before any step is trained or saved."""
    from hfemb.training.runner import run_training

    out = tmp_path / "few"
    cfg = make_config(tiny_qwen3, mined_file, out, finetune="full",
                      training={"save_strategy": "epoch", "num_train_epochs": 1, "average_checkpoints": 2})
    with pytest.raises(ConfigError, match=r"'training.average_checkpoints' is 2 but this run saves only 1 checkpoint"):
        run_training(cfg)
    assert not list(out.glob("checkpoint-*")) and not (out / "merged").exists()


def test_resumed_run_averages_checkpoints_of_both_parts(tiny_qwen3, mined_file, tmp_path):  # noqa: F811
    """A run resumed from checkpoint-3 averages 2 and 3 (saved before the interruption) with the new 4."""
    import shutil

    from hfemb.training.runner import run_training

    out = tmp_path / "resumed"
    settings = {"save_strategy": "steps", "save_steps": 1, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                "learning_rate": 2e-2, "max_steps": 4, "average_checkpoints": 3}
    run_training(make_config(tiny_qwen3, mined_file, out, finetune="full", training=settings))
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "merged")
    summary = run_training(make_config(tiny_qwen3, mined_file, out, finetune="full", training=settings),
                           resume=str(out / "checkpoint-3"))
    assert summary["checkpoint_averaging"]["steps"] == [2, 3, 4]
    c = [_weights(out / f"checkpoint-{i}") for i in (2, 3, 4)]
    merged = _weights(out / "merged")
    for name in merged:
        np.testing.assert_allclose(merged[name], (c[0][name] + c[1][name] + c[2][name]) / 3, rtol=2.5e-7,
                                   atol=1e-7)  # one fp32 rounding


def test_only_this_runs_complete_checkpoints_are_averaged(tmp_path):
    """Checkpoints are chosen from the steps this run saved (a leftover checkpoint of an earlier run in the same
    folder is ignored), the last k of them; a missing or incomplete one is named."""
    from hfemb.errors import HfembError
    from hfemb.training.averaging import checkpoints_to_average

    for step in (1, 2, 3, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        if step != 6:  # checkpoint-6: killed while being written
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert [p.name for p in checkpoints_to_average(tmp_path, [2, 4], 2)] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in checkpoints_to_average(tmp_path, [4, 2, 3, 4], 2)] == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(HfembError, match="missing checkpoint-6"):
        checkpoints_to_average(tmp_path, [4, 6], 2)
    with pytest.raises(HfembError, match="only 1 complete checkpoint"):
        checkpoints_to_average(tmp_path, [4], 2)
