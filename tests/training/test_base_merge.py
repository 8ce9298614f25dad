"""export.base_merge_alpha: merged/ interpolated with the base after training (auto on corpus-mined rows)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hfemb.errors import ConfigError, HfembError
from hfemb.training.config import (CORPUS_BASE_MERGE_ALPHA, ExportConfig, config_from_dict,
                                   resolved_base_merge_alpha)


@pytest.mark.parametrize("modes, expected", [
    (["corpus"], CORPUS_BASE_MERGE_ALPHA), (["corpus", "corpus"], CORPUS_BASE_MERGE_ALPHA), (["pool"], 1.0),
    ([None], 1.0), (["corpus", "pool"], 1.0), ([], 1.0)])
def test_auto_interpolates_only_when_every_file_was_corpus_mined(modes, expected):
    assert resolved_base_merge_alpha(ExportConfig(), modes) == expected
    assert resolved_base_merge_alpha(ExportConfig(base_merge_alpha=0.6), modes) == 0.6  # explicit wins


def test_config_refuses_alpha_outside_zero_one():
    base = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}, "training": {"output_dir": "o"}}
    assert config_from_dict(base).export.base_merge_alpha is None
    assert config_from_dict({**base, "export": {"base_merge_alpha": 1}}).export.base_merge_alpha == 1
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="'export.base_merge_alpha' must be in \\(0, 1\\]"):
            config_from_dict({**base, "export": {"base_merge_alpha": bad}})
    with pytest.raises(ConfigError, match="'export.base_merge_alpha' must be a number or null, got True"):
        config_from_dict({**base, "export": {"base_merge_alpha": True}})


def _rows(zh_sample_csv, tmp_path, mode):
    """16 rows with two negatives each, marked as mined in ``mode`` (None: rows hfemb did not mine)."""
    from hfemb.data.formats import read_records

    recs = read_records(str(zh_sample_csv)).records[:16]
    answers = [r.positives[0] for r in recs]
    path = tmp_path / f"rows-{mode}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(recs):
            row = {"query": r.query, "positive": answers[i], "negative": [answers[(i + 3) % 16], answers[(i + 7) % 16]]}
            if mode:
                row["mining"] = {"mode": mode, "kinds": ["hard", "easy"]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _run(model, train_file, out, finetune_type="lora", **export):
    from hfemb.training.runner import run_training

    return run_training(config_from_dict({
        "model": {"name_or_path": model, "finetune_type": finetune_type, "torch_dtype": "float32"},
        "data": {"train_file": train_file, "query_max_len": 32, "passage_max_len": 48, "num_negatives": 2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "export": export,
        "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 2,
                     "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
                     "seed": 0, "dataloader_pin_memory": False, "disable_tqdm": True}}))


@pytest.mark.parametrize("finetune_type", ["lora", "full"])
def test_merged_is_the_interpolation_of_the_base_and_the_trained_weights(tiny_qwen3, zh_sample_csv, tmp_path,
                                                                          finetune_type):
    """The same run with alpha 0.4 and 1: the first's merged/ is 0.6 * base + 0.4 * the second's, per tensor (LoRA:
    base + 0.4 * the adapter's delta), its adapter unchanged; the provenance file, summary and card say so."""
    rows = _rows(zh_sample_csv, tmp_path, None)
    plain = _run(tiny_qwen3, rows, tmp_path / "plain", finetune_type)
    assert plain["data"]["base_merge_alpha"] == {"value": 1.0, "auto": True} and "base_merge" not in plain
    assert not (tmp_path / "plain" / "merged" / "hfemb_merge.json").exists()
    mixed = _run(tiny_qwen3, rows, tmp_path / "mixed", finetune_type, base_merge_alpha=0.4)
    base = load_file(f"{tiny_qwen3}/model.safetensors")
    trained = load_file(str(tmp_path / "plain" / "merged" / "model.safetensors"))
    got = load_file(str(tmp_path / "mixed" / "merged" / "model.safetensors"))
    assert set(got) == set(trained)
    moved = 0
    for name, t in trained.items():
        expect = 0.6 * base[name].float() + 0.4 * t.float() if t.is_floating_point() else t
        torch.testing.assert_close(got[name], expect.to(t.dtype), rtol=1e-6, atol=1e-7)
        moved += not torch.equal(t, base[name])
    assert moved  # training changed some tensors, so the interpolation is not the identity
    record = json.loads((tmp_path / "mixed" / "merged" / "hfemb_merge.json").read_text())
    assert (record["alpha"], record["method"], record["by"]) == (0.4, "linear", "export.base_merge_alpha")
    assert record["tuned"] == "this run's trained weights" and mixed["base_merge"]["alpha"] == 0.4
    assert mixed["config"]["export"]["base_merge_alpha"] == 0.4
    card = (tmp_path / "mixed" / "merged" / "README.md").read_text()
    assert "**interpolation with the base** (linear, alpha 0.4)" in card and "`export.base_merge_alpha`" in card
    if finetune_type == "lora":  # the adapter stays the trained one
        a = load_file(str(tmp_path / "mixed" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_auto_merges_corpus_mined_rows_and_leaves_pool_rows(tiny_qwen3, zh_sample_csv, tmp_path):
    corpus = _run(tiny_qwen3, _rows(zh_sample_csv, tmp_path, "corpus"), tmp_path / "corpus")
    assert corpus["data"]["base_merge_alpha"] == {"value": CORPUS_BASE_MERGE_ALPHA, "auto": True}
    merged = tmp_path / "corpus" / "merged" / "hfemb_merge.json"
    assert merged.exists() == (CORPUS_BASE_MERGE_ALPHA < 1)
    pool = _run(tiny_qwen3, _rows(zh_sample_csv, tmp_path, "pool"), tmp_path / "pool")
    assert pool["data"]["base_merge_alpha"]["value"] == 1.0
    assert not (tmp_path / "pool" / "merged" / "hfemb_merge.json").exists()


def test_a_failed_interpolation_keeps_the_trained_weights_and_says_how_to_retry(tiny_qwen3, zh_sample_csv,
                                                                                 tmp_path, monkeypatch):
    import hfemb.training.runner as runner

    def unreachable(name):
        raise HfembError(f"{name}: cannot get the model's weights: offline")

    monkeypatch.setattr(runner, "model_folder", unreachable)
    rows = _rows(zh_sample_csv, tmp_path, None)
    with pytest.raises(HfembError, match="holds the trained weights.*hfemb merge-weights"):
        _run(tiny_qwen3, rows, tmp_path / "failed", "full", base_merge_alpha=0.5)
    summary = json.loads((tmp_path / "failed" / "train_summary.json").read_text())
    assert summary["base_merge"]["alpha"] == 0.5 and "offline" in summary["base_merge"]["error"]
    monkeypatch.undo()
    _run(tiny_qwen3, rows, tmp_path / "plain", "full")
    a = load_file(str(tmp_path / "failed" / "merged" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "merged" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b) and not math.isnan(float(next(iter(a.values())).float().sum()))
