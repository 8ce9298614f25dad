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


def _run(model, train_file, out, finetune_type="lora", training=None, **export):
    from hfemb.training.runner import run_training

    return run_training(config_from_dict({
        "model": {"name_or_path": model, "finetune_type": finetune_type, "torch_dtype": "float32"},
        "data": {"train_file": train_file, "query_max_len": 32, "passage_max_len": 48, "num_negatives": 2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "export": export,
        "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 2,
                     "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
                     "seed": 0, "dataloader_pin_memory": False, "disable_tqdm": True, **(training or {})}}))


def _weights(out):
    return load_file(str(out / "merged" / "model.safetensors"))


def _assert_interpolation(got, base, trained, alpha):
    """``got`` = (1 - alpha) * base + alpha * trained per tensor (fp32), and training moved some tensor."""
    assert set(got) == set(trained)
    moved = 0
    for name, t in trained.items():
        expect = (1 - alpha) * base[name].float() + alpha * t.float() if t.is_floating_point() else t
        torch.testing.assert_close(got[name], expect, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(t, base[name])
    assert moved  # training changed some tensors, so the interpolation is not the identity


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
    _assert_interpolation(_weights(tmp_path / "mixed"), load_file(f"{tiny_qwen3}/model.safetensors"),
                          _weights(tmp_path / "plain"), 0.4)
    record = json.loads((tmp_path / "mixed" / "merged" / "hfemb_merge.json").read_text())
    assert (record["alpha"], record["method"], record["by"]) == (0.4, "linear", "export.base_merge_alpha")
    assert record["tuned"] == "this run's trained weights" and mixed["base_merge"]["alpha"] == 0.4
    assert record["stored_dtype"] == "float32"
    assert mixed["config"]["export"]["base_merge_alpha"] == 0.4
    card = (tmp_path / "mixed" / "merged" / "README.md").read_text()
    assert "**interpolation with the base** (linear, alpha 0.4)" in card and "`export.base_merge_alpha`" in card
    assert "auto: rows mined in corpus mode" not in card  # set explicitly
    if finetune_type == "lora":  # the adapter stays the trained one, and its card says merged/ is not it
        assert "**`merged/` is not this adapter's model**" in (tmp_path / "mixed" / "adapter" / "README.md").read_text()
        assert "not this adapter" not in (tmp_path / "plain" / "adapter" / "README.md").read_text()
        a = load_file(str(tmp_path / "mixed" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_auto_merges_corpus_mined_rows_and_leaves_pool_rows(tiny_qwen3, zh_sample_csv, tmp_path):
    assert CORPUS_BASE_MERGE_ALPHA == 0.3
    rows = _rows(zh_sample_csv, tmp_path, "corpus")
    corpus = _run(tiny_qwen3, rows, tmp_path / "corpus")
    assert corpus["data"]["base_merge_alpha"] == {"value": 0.3, "auto": True}
    assert corpus["base_merge"]["alpha"] == 0.3 and corpus["config"]["export"]["base_merge_alpha"] == 0.3
    assert "(after training, `export.base_merge_alpha` auto: rows mined in corpus mode;" in (
        tmp_path / "corpus" / "merged" / "README.md").read_text()
    _run(tiny_qwen3, rows, tmp_path / "trained", base_merge_alpha=1)
    _assert_interpolation(_weights(tmp_path / "corpus"), load_file(f"{tiny_qwen3}/model.safetensors"),
                          _weights(tmp_path / "trained"), 0.3)
    pool = _run(tiny_qwen3, _rows(zh_sample_csv, tmp_path, "pool"), tmp_path / "pool")
    assert pool["data"]["base_merge_alpha"]["value"] == 1.0
    assert not (tmp_path / "pool" / "merged" / "hfemb_merge.json").exists()


def test_a_failed_interpolation_keeps_the_trained_weights_and_says_how_to_retry(tiny_qwen3, zh_sample_csv,
                                                                                 tmp_path, monkeypatch):
    import hfemb.training.base_merge as base_merge

    def unreachable(name, **kwargs):
        raise OSError(f"{name}: offline and not cached")

    monkeypatch.setattr(base_merge, "load_embedding_model", unreachable)  # (the base's reload, after training)
    rows = _rows(zh_sample_csv, tmp_path, None)
    with pytest.raises(HfembError, match="holds the trained weights.*hfemb merge-weights"):
        _run(tiny_qwen3, rows, tmp_path / "failed", "full", base_merge_alpha=0.5,
             training={"max_steps": 4}, )
    summary = json.loads((tmp_path / "failed" / "train_summary.json").read_text())
    assert summary["base_merge"]["alpha"] == 0.5 and "offline" in summary["base_merge"]["error"]
    card = (tmp_path / "failed" / "merged" / "README.md").read_text()  # the run was finished: curves, card
    assert "was configured but failed" in card and (tmp_path / "failed" / "training_curves.png").exists()
    assert not (tmp_path / "failed" / "merged" / "hfemb_merge.json").exists()
    monkeypatch.undo()
    _run(tiny_qwen3, rows, tmp_path / "plain", "full", training={"max_steps": 4})
    a = load_file(str(tmp_path / "failed" / "merged" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "merged" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b) and not math.isnan(float(next(iter(a.values())).float().sum()))


def test_a_causal_lm_base_is_read_as_training_read_it(tiny_qwen3, zh_sample_csv, tmp_path):
    """A base saved with a language-model head (``model.`` prefix, ``lm_head``): the interpolation uses the
    backbone's tensors as transformers' AutoModel loads them, under the names merged/ was saved with."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    lm_dir = tmp_path / "lm-base"
    AutoModelForCausalLM.from_pretrained(tiny_qwen3).save_pretrained(lm_dir)
    AutoTokenizer.from_pretrained(tiny_qwen3).save_pretrained(lm_dir)
    assert any(k.startswith("model.") for k in load_file(str(lm_dir / "model.safetensors")))
    rows = _rows(zh_sample_csv, tmp_path, None)
    _run(str(lm_dir), rows, tmp_path / "plain", "full")
    _run(str(lm_dir), rows, tmp_path / "mixed", "full", base_merge_alpha=0.5)
    base = AutoModel.from_pretrained(lm_dir, torch_dtype=torch.float32).state_dict()
    _assert_interpolation(_weights(tmp_path / "mixed"), base, _weights(tmp_path / "plain"), 0.5)


def test_a_checkpoint_average_keeps_its_record_when_merged_with_the_base(tiny_qwen3, zh_sample_csv, tmp_path):
    rows = _rows(zh_sample_csv, tmp_path, None)
    _run(tiny_qwen3, rows, tmp_path / "avg", "full", base_merge_alpha=0.5,
         training={"max_steps": 2, "save_strategy": "steps", "save_steps": 1, "average_checkpoints": 2})
    merged = tmp_path / "avg" / "merged"
    assert json.loads((merged / "hfemb_averaging.json").read_text())["k"] == 2
    assert json.loads((merged / "hfemb_merge.json").read_text())["tuned_checkpoint_averaging"]["k"] == 2
    card = (merged / "README.md").read_text()
    assert "**checkpoint averaging**" in card and "**interpolation with the base** (linear, alpha 0.5)" in card
