"""Packed batches under DeepSpeed ZeRO-3: two gloo processes on CPU (torchrun), each with texts of other
lengths than the other's, train through the real CLI with ``model.padding_free=true``; the adapter and
merged model equal those of a padded DDP run with the same settings, and every process makes exactly one
backbone call per query batch and one per document batch (what keeps ZeRO-3's parameter gathering in step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hfemb.testing.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import HAS_DEEPSPEED, _assert_same_weights  # noqa: E402

B, N = 2, 2  # per process and step: 2 queries, 1 positive + 2 negatives each


def _rows(zh_sample_csv) -> list[dict]:
    """8 rows whose texts all have different lengths (so the two processes never see the same lengths)."""
    from hfemb.data.formats import read_records

    recs = read_records(str(zh_sample_csv)).records
    rows, seen = [], set()
    for i, r in enumerate(recs):
        key = (len(r.query), len(r.positives[0]))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"query": r.query, "positive": r.positives[0],
                     "negative": [recs[(i + 7) % len(recs)].positives[0], recs[(i + 13) % len(recs)].positives[0]]})
        if len(rows) == 8:
            break
    return rows


def _torchrun_main(out: str) -> None:
    """Each process: count the packed backbone calls and their token counts, then train each run's config."""
    import hfemb.modeling.model as model_module
    from hfemb.cli import main
    from hfemb.training.distributed import rank

    calls: list[list[int]] = []
    packed_forward = model_module.packed_forward

    def counting(backbone, input_ids, attention_mask, *args, **kwargs):
        calls.append(attention_mask.sum(dim=1).tolist())
        return packed_forward(backbone, input_ids, attention_mask, *args, **kwargs)

    model_module.packed_forward = counting
    results = {}
    for run in ("zero3_packed", "ddp_padded"):
        calls.clear()
        assert main(["train", f"{out}/{run}.json"]) == 0
        results[run] = list(calls)
    Path(out, f"calls{rank()}.json").write_text(json.dumps(results))


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_packed_run_equals_padded_ddp_run(tiny_qwen3, zh_sample_csv, tmp_path):
    rows = _rows(zh_sample_csv)
    assert len(rows) == 8
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                          encoding="utf-8")
    for run, deepspeed, padding_free in (("zero3_packed", True, True), ("ddp_padded", False, False)):
        training = {"output_dir": str(tmp_path / run), "per_device_train_batch_size": B, "num_train_epochs": 1,
                    "learning_rate": 1e-3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "seed": 0,
                    "report_to": "none", "logging_steps": 1, "disable_tqdm": True, "save_strategy": "no"}
        if deepspeed:
            training["deepspeed"] = str(REPO / "configs" / "deepspeed" / "zero3.json")
        (tmp_path / f"{run}.json").write_text(json.dumps({
            "model": {"name_or_path": tiny_qwen3, "torch_dtype": "float32", "finetune_type": "lora",
                      "padding_free": padding_free},
            "data": {"train_file": str(tmp_path / "train.jsonl"), "num_negatives": N, "query_max_len": 32,
                     "passage_max_len": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "training": training}), encoding="utf-8")
    run_torchrun(__file__, tmp_path)

    calls = [json.loads((tmp_path / f"calls{r}.json").read_text()) for r in range(2)]
    packed = [c["zero3_packed"] for c in calls]
    assert [len(c) for c in packed] == [2 * 2, 2 * 2]  # 2 steps x (queries, documents): one call each
    assert all(len(batch) in (B, B * (1 + N)) for c in packed for batch in c)
    assert any(sorted(a) != sorted(b) for a, b in zip(*packed))  # the processes' texts differ in length
    assert calls[0]["ddp_padded"] == [] and calls[1]["ddp_padded"] == []  # the reference is padded

    summary = json.loads((tmp_path / "zero3_packed" / "train_summary.json").read_text())
    reference = json.loads((tmp_path / "ddp_padded" / "train_summary.json").read_text())
    assert summary["padding_free"] is True and reference["padding_free"] is False
    assert summary["global_step"] == reference["global_step"] == 2
    assert summary["train"]["train_loss"] == pytest.approx(reference["train"]["train_loss"], abs=1e-4)
    _assert_same_weights(tmp_path / "zero3_packed" / "adapter", tmp_path / "ddp_padded" / "adapter")
    _assert_same_weights(tmp_path / "zero3_packed" / "merged", tmp_path / "ddp_padded" / "merged")
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "zero3_packed" / "adapter" / "adapter_model.safetensors"))
    assert max(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 1e-4  # trained (B starts at 0)


if __name__ == "__main__":  # run by torchrun from the test
    _torchrun_main(sys.argv[1])
