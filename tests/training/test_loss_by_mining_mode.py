"""Loss defaults by how the rows were mined: temperature and distillation weight for corpus vs other rows."""

from __future__ import annotations

import json

import pytest

from hfemb.data.formats import read_records
from hfemb.data.records import Record
from hfemb.errors import ConfigError
from hfemb.mining.mine import MiningConfig, mine, report_path
from hfemb.training.config import (CORPUS_DISTILL_WEIGHT, CORPUS_TEMPERATURE, DEFAULT_DISTILL_WEIGHT,
                                   POOL_TEMPERATURE, LossConfig, config_from_dict, corpus_mined,
                                   resolved_distill_weight, resolved_temperature)
from hfemb.training.data_rows import mined_mode

# Auto: 0.05 when every training file was corpus-mined, else 0.1; CORPUS_DISTILL_WEIGHT when corpus-mined rows carry
# teacher scores (off for others); explicit settings always win; what a run resolves is what its loss uses.


@pytest.mark.parametrize("modes, expected", [
    (["corpus"], 0.05), (["corpus", "corpus"], 0.05), (["pool"], 0.1), ([None], 0.1), (["corpus", "pool"], 0.1),
    (["corpus", None], 0.1), ([], 0.1)])
def test_auto_is_corpus_temperature_only_when_every_file_was_corpus_mined(modes, expected):
    assert (CORPUS_TEMPERATURE, POOL_TEMPERATURE) == (0.05, 0.1)
    assert resolved_temperature(LossConfig(), modes) == expected
    assert resolved_temperature(LossConfig(temperature=0.07), modes) == 0.07  # explicit wins


def test_corpus_distill_weight_applies_only_to_corpus_rows_with_teacher_scores():
    assert (CORPUS_DISTILL_WEIGHT, DEFAULT_DISTILL_WEIGHT) == (3.0, 0.0)
    for modes, taught, expected in ((["corpus"], True, CORPUS_DISTILL_WEIGHT), (["corpus"], False, 0.0),
                                    (["pool"], True, 0.0),
                                    ([None], True, 0.0), (["corpus", "pool"], True, 0.0)):
        assert resolved_distill_weight(LossConfig(), taught, corpus_mined(modes)) == expected
        assert resolved_distill_weight(LossConfig(distill_weight=0.5), taught, corpus_mined(modes)) == 0.5
    assert resolved_distill_weight(LossConfig(), True) == 0.0  # (the trainer's call: rows as given)


def test_config_accepts_null_and_refuses_non_positive():
    base = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}, "training": {"output_dir": "o"}}
    assert config_from_dict({**base, "loss": {"temperature": None}}).loss.temperature is None
    assert config_from_dict(base).loss.temperature is None
    for bad in (0, -0.1, float("inf")):
        with pytest.raises(ConfigError, match="'loss.temperature' must be > 0"):
            config_from_dict({**base, "loss": {"temperature": bad}})


def test_mined_files_name_their_mode(tmp_path):
    """`hfemb mine` rows record the mode in `mining`; a file read back gives it, one of mixed or unmined rows none."""
    texts = ["eat less salt", "eat less sugar", "sleep early", "drink water", "walk daily", "stop smoking"]
    pairs = [Record(f"question {i}", [t]) for i, t in enumerate(texts)]
    corpus_rows = mine(pairs, MiningConfig(tokenizer="regex", num_negatives=2, num_hard=1, use_cache=False)).rows
    pools = [Record(f"q{i}", [texts[i]], texts[i + 1:i + 4], candidates=[(texts[i], 1)] + [(t, 0) for t in
                                                                                          texts[i + 1:i + 4]])
             for i in range(3)]
    pool_rows = mine(pools, MiningConfig(mode="pool", tokenizer="regex", num_negatives=2, num_hard=1,
                                         use_cache=False)).rows
    assert corpus_rows and pool_rows
    for name, rows, mode in (("c", corpus_rows, "corpus"), ("p", pool_rows, "pool"),
                             ("mixed", corpus_rows + pool_rows, None),
                             ("plain", [{k: r[k] for k in ("query", "positive", "negative")} for r in pool_rows], None)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert mined_mode(read_records(str(path)).records, None, str(path)) == mode
    assert mined_mode([], {"mode": "corpus"}) == "corpus"  # this run's mining report decides
    # rows mined before they named their mode: the report `hfemb mine` wrote beside the file, if its count matches
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({**r, "mining": {"kinds": r["mining"]["kinds"]}}) + "\n" for r in corpus_rows))
    records = read_records(str(old)).records
    assert mined_mode(records, None, str(old)) is None  # no report
    report_path(old).write_text(json.dumps({"mode": "corpus", "rows_written": len(corpus_rows)}))
    assert mined_mode(records, None, str(old)) == "corpus"
    report_path(old).write_text(json.dumps({"mode": "corpus", "rows_written": len(corpus_rows) + 1}))
    assert mined_mode(records, None, str(old)) is None  # a report of another file
    odd = tmp_path / "odd.jsonl"  # a mode that is not a string is no mode
    odd.write_text("".join(json.dumps({**r, "mining": {"mode": ["corpus"]}}) + "\n" for r in corpus_rows))
    assert mined_mode(read_records(str(odd)).records, None, str(odd)) is None


def _pairs(zh_sample_csv, tmp_path):
    recs = read_records(str(zh_sample_csv)).records[:16]
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"query": r.query, "positive": r.positives[0]}, ensure_ascii=False) + "\n"
                           for r in recs), encoding="utf-8")
    return str(raw)


def _run(model, train_file, out, steps, **loss):
    """A short LoRA run of the tiny Qwen3 on ``train_file`` (mined in the run when it has no negatives): its summary
    and logged losses."""
    from hfemb.training.runner import run_training

    summary = run_training(config_from_dict({
        "model": {"name_or_path": model, "finetune_type": "lora", "torch_dtype": "float32"},
        "data": {"train_file": train_file, "query_max_len": 32, "passage_max_len": 48, "num_negatives": 2},
        "mining": {"tokenizer": "jieba", "hard_top_k": 4, "easy_bottom_k": 4, "num_hard": 1},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "loss": loss,
        "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": steps,
                     "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
                     "seed": 0, "dataloader_pin_memory": False, "disable_tqdm": True}}))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return summary, [r["loss"] for r in log if "loss" in r]


def test_a_run_on_corpus_mined_pairs_trains_at_the_corpus_temperature(tiny_qwen3, zh_sample_csv, tmp_path):
    """Pairs mined in the run (corpus mode): auto resolves to 0.05, recorded in the summary and card, and the
    logged losses equal those of the same run with `loss.temperature: 0.05` (and differ from 0.1's)."""
    raw = _pairs(zh_sample_csv, tmp_path)
    auto, auto_losses = _run(tiny_qwen3, raw, tmp_path / "auto", 3)
    assert auto["data"]["temperature"] == {"value": 0.05, "auto": True, "mined_modes": ["corpus"]}
    assert auto["config"]["loss"]["temperature"] == 0.05
    card = (tmp_path / "auto" / "merged" / "README.md").read_text()
    assert "temperature 0.05 (auto: rows mined in corpus mode)," in card
    assert "- **temperature**" not in card and "- **train**: `pairs.jsonl`" in card  # data bullets: files only
    explicit, losses = _run(tiny_qwen3, raw, tmp_path / "explicit", 3, temperature=0.05)
    assert explicit["data"]["temperature"]["auto"] is False and len(auto_losses) == 3
    assert "temperature 0.05, " in (tmp_path / "explicit" / "merged" / "README.md").read_text()
    assert auto_losses == pytest.approx(losses, rel=1e-6)
    _, pool_like = _run(tiny_qwen3, raw, tmp_path / "t01", 3, temperature=0.1)
    assert auto_losses[0] != pytest.approx(pool_like[0], rel=1e-3)


def test_corpus_rows_with_teacher_scores_train_at_the_corpus_settings(tiny_qwen3, zh_sample_csv, tmp_path):
    """A file of corpus-mined rows with teacher cosines: auto trains at 0.05 and CORPUS_DISTILL_WEIGHT, exactly as
    the same run with both set; the same rows marked as pool-mined train as with distillation off at 0.1."""
    recs = read_records(str(zh_sample_csv)).records[:16]
    answers = [r.positives[0] for r in recs]

    def write(mode):
        path = tmp_path / f"{mode}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i, r in enumerate(recs):
                fh.write(json.dumps({"query": r.query, "positive": answers[i],
                                     "negative": [answers[(i + 3) % 16], answers[(i + 7) % 16]],
                                     "mining": {"mode": mode, "kinds": ["hard", "easy"]},
                                     "pos_scores": [0.8], "neg_scores": [0.1 + 0.02 * i, -0.2]},
                                    ensure_ascii=False) + "\n")
        return str(path)

    corpus, pool = write("corpus"), write("pool")
    auto, auto_losses = _run(tiny_qwen3, corpus, tmp_path / "auto", 2)
    w = CORPUS_DISTILL_WEIGHT
    assert auto["data"]["distill_weight"] == {"value": w, "auto": True, "teacher_scores": True}
    assert auto["config"]["loss"]["distill_weight"] == w and auto["config"]["loss"]["temperature"] == 0.05
    assert ("KL distillation from the rows' teacher scores" in
            (tmp_path / "auto" / "merged" / "README.md").read_text()) == bool(w)
    _, explicit = _run(tiny_qwen3, corpus, tmp_path / "explicit", 2, temperature=0.05, distill_weight=w)
    assert len(auto_losses) == 2 and auto_losses == pytest.approx(explicit, rel=1e-6)
    _, other = _run(tiny_qwen3, corpus, tmp_path / "other", 2, temperature=0.05, distill_weight=0.0 if w else 1.0)
    assert abs(auto_losses[0] - other[0]) > 1e-4  # the KL term is (or is not) in the first step's loss
    pooled, pool_losses = _run(tiny_qwen3, pool, tmp_path / "pool", 2)
    assert pooled["data"]["distill_weight"]["value"] == 0.0 and pooled["config"]["loss"]["temperature"] == 0.1
    _, plain = _run(tiny_qwen3, pool, tmp_path / "plain", 2, temperature=0.1, distill_weight=0.0)
    assert pool_losses == pytest.approx(plain, rel=1e-6)


def test_trainer_without_a_resolved_temperature_uses_the_pool_one(tiny_qwen3, tmp_path):
    from transformers import TrainingArguments

    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    trainer = MultiNegEmbeddingTrainer(model=load_embedding_model(tiny_qwen3),
                                       args=TrainingArguments(str(tmp_path), report_to="none"),
                                       train_dataset=[], loss_config=LossConfig())
    assert trainer.loss_config.temperature == POOL_TEMPERATURE
