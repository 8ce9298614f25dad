"""``data.pool_negatives``: rows drawing N negatives (default 15, 7 by SimANS) from all of their record's candidates
(pools and negatives together, repeated when short), by SimANS for teacher rows, checked against hand-built pools."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from hfemb.data.formats import read_records
from hfemb.errors import ConfigError, DataError
from hfemb.training.config import POOL_NEGATIVES_AUTO, POOL_NEGATIVES_AUTO_SIMANS, DataConfig
from hfemb.training.data_rows import pool_negatives_setting, rows_from_records
from hfemb.training.redraw import REDRAW_KEY, pooled_draw, record_pool, redrawn

from tests.training.test_redraw import _row, _write, answers  # noqa: F401  (answers: a fixture)
from tests.training.test_trainer import make_config


def test_record_pool_by_hand():
    extra = {"negative_candidates": {"hard": ["a", "b", "P"], "easy": ["c", "d"]},
             "negative_candidate_scores": {"hard": [0.5, 0.4, 0.9], "easy": [0.1, 0.2]}}
    # "e": a mined negative outside the written pools (hfemb mine leaves out a pool its picks exhaust)
    pool, scores = record_pool(extra, "f.jsonl", ["b", "e"], [0.4, 0.3], positives=["P"])
    assert pool == ["a", "b", "c", "d", "e"] and scores == [0.5, 0.4, 0.1, 0.2, 0.3]  # the positive P left out
    assert record_pool(extra, None, ["b", "e"], None) == (["a", "b", "P", "c", "d", "e"], None)
    # teacher scores of the negatives only: the pools are left out (their texts have no score)
    assert record_pool({"negative_candidates": extra["negative_candidates"]}, None, ["b", "e"], [0.4, 0.3]) == \
        (["b", "e"], [0.4, 0.3])
    with pytest.raises(Exception, match="expected 2 numbers for the 'easy' pool"):
        record_pool({**extra, "negative_candidate_scores": {"hard": [0.5, 0.4, 0.9], "easy": [0.1]}}, "f.jsonl",
                    ["b"], [0.4])


def test_pooled_draw_repeats_a_short_pool_like_flagembedding():
    for seed in range(50):
        negatives, scores, spec = pooled_draw(["a", "b", "c"], [0.3, 0.2, 0.1], 7, random.Random(seed))
        assert len(negatives) == 7 and max(Counter(negatives).values()) <= 3  # ceil(7 / 3)
        assert set(negatives) == {"a", "b", "c"}  # 7 of the 9 positions: every text at least once
        assert scores == [{"a": 0.3, "b": 0.2, "c": 0.1}[t] for t in negatives]
        assert spec == {"slots": [list(range(7))], "pools": [["a", "b", "c"] * 3], "scores": [[0.3, 0.2, 0.1] * 3]}
    negatives, scores, _ = pooled_draw(list("abcdefghij"), None, 7, random.Random(0))
    assert len(set(negatives)) == 7 and scores is None  # a pool large enough: distinct texts


def test_auto_setting():
    assert pool_negatives_setting(DataConfig()) == POOL_NEGATIVES_AUTO == 15
    assert pool_negatives_setting(DataConfig(), simans=True) == POOL_NEGATIVES_AUTO_SIMANS == 7
    assert pool_negatives_setting(DataConfig(num_negatives=9), simans=True) == 9  # never fewer than asked
    assert pool_negatives_setting(DataConfig(num_negatives=16)) == 16
    assert pool_negatives_setting(DataConfig(redraw_negatives=False)) == 0
    assert pool_negatives_setting(DataConfig(pool_negatives=5)) == 5
    assert pool_negatives_setting(DataConfig(pool_negatives=0)) == 0
    assert pool_negatives_setting(DataConfig(num_negatives=9)) == 15  # auto never keeps fewer than asked
    assert pool_negatives_setting(DataConfig(num_negatives=0)) == 0  # in-batch negatives only stays so


def test_auto_keeps_rows_as_mined_when_their_pools_offer_nothing_more(answers, tmp_path, monkeypatch):
    """Rows without pools (``--no-candidates``) would only repeat their mined negatives: auto keeps them. Each
    kind of file is built once, but for reranker logits (auto's first guess, SimANS, is undone by the rows)."""
    from hfemb.training import data_rows

    builds: list[int] = []  # pool_negatives of each rows_from_records call

    def counted(*args, **kwargs):
        builds.append(kwargs["pool_negatives"])
        return rows_from_records(*args, **kwargs)

    monkeypatch.setattr(data_rows, "rows_from_records", counted)

    def rows_of(file_rows, name, **data):
        cfg = make_config("m", _write(tmp_path / name, file_rows), tmp_path / "o", data={"pool_negatives": None,
                                                                                          **data})
        report: dict = {}
        builds.clear()
        rows = data_rows.load_rows(cfg, cfg.data.train_file, tmp_path / "cache", report, "train")
        return rows, report["train"]["pool_negatives"]

    full = [_row(i, answers, teacher=True) for i in range(6)]
    rows, pooled = rows_of(full, "full.jsonl")  # teacher rows, drawn by SimANS: 7
    assert pooled == 7 and {len(r["negatives"]) for r in rows} == {7} and builds == [7]
    rows, pooled = rows_of(full, "full.jsonl", redraw_sampling="uniform")  # the same rows drawn uniformly: 15
    assert pooled == 15 and {len(r["negatives"]) for r in rows} == {15} and builds == [15]
    rows, pooled = rows_of([_row(i, answers) for i in range(6)], "plain.jsonl")  # no teacher: uniform, 15
    assert pooled == 15 and {len(r["negatives"]) for r in rows} == {15} and REDRAW_KEY in rows[0] and builds == [15]
    logits = [{**r, "pos_scores": [5.0]} for r in full]  # not cosines (reranker logits): auto draws uniformly, 15
    rows, pooled = rows_of(logits, "logits.jsonl")
    assert pooled == 15 and {len(r["negatives"]) for r in rows} == {15} and builds == [7, 15]
    bare = [{k: v for k, v in r.items() if not k.startswith("negative_candidate")} for r in full]
    rows, pooled = rows_of(bare, "bare.jsonl")
    assert pooled == 0 and [r["negatives"] for r in rows] == [r["negative"] for r in full]
    rows, pooled = rows_of(bare, "bare.jsonl", pool_negatives=4)  # asked for: repeats the 2
    assert pooled == 4 and all(sorted(Counter(r["negatives"]).values()) == [2, 2] for r in rows)
    with pytest.raises(DataError, match=r"bad\.jsonl:1, field 'negative_candidate_scores': expected \{kind: \[score"):
        rows_of([{**full[0], "negative_candidate_scores": [0.1]}], "bad.jsonl")


@pytest.mark.parametrize("value", [-1, True, "7", 2.5])
def test_bad_setting_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match=r"config: 'data.pool_negatives' must be (an integer >= 0|a whole number) or null"):
        make_config("m", "t.jsonl", tmp_path, data={"pool_negatives": value})


def test_rows_draw_from_the_whole_pool_and_teacher_scores_follow(answers, tmp_path):
    file_rows = [_row(i, answers, teacher=True) for i in range(24)]
    score = {t: round(0.01 * (k + 1), 6) for k, t in enumerate(answers)}  # _row's made-up teacher
    records = read_records(_write(tmp_path / "mined.jsonl", file_rows)).records
    rows, counts = rows_from_records(records, 2, seed=0, pool_negatives=9)
    assert counts == {"rows": 24, "dropped_short_of_negatives": 0}
    for row, raw in zip(rows, file_rows):
        whole = raw["negative_candidates"]["hard"] + raw["negative_candidates"]["easy"]  # 7 texts, hard and easy
        assert row[REDRAW_KEY]["pools"] == [whole * 2] and row[REDRAW_KEY]["slots"] == [list(range(9))]
        for epoch in range(3):  # SimANS draws from epoch 0; uniform draws keep the first draw in epoch 0
            for width in (None, 0.05):
                drawn = redrawn(row, 0, epoch, 0, simans_width=width)
                assert len(drawn["negatives"]) == 9 and max(Counter(drawn["negatives"]).values()) <= 2
                assert set(drawn["negatives"]) <= set(whole)
                assert drawn["teacher_scores"] == [0.9] + [score[t] for t in drawn["negatives"]]
    plain, _ = rows_from_records(records, 2, seed=0)  # without: as mined
    assert [r["negatives"] for r in plain] == [r["negative"] for r in file_rows]
    untaught = read_records(_write(tmp_path / "plain.jsonl", [_row(i, answers) for i in range(4)])).records
    for row in rows_from_records(untaught, 2, 0, pool_negatives=5)[0]:  # no teacher: uniform, epoch 0 as drawn
        assert len(row["negatives"]) == 5 and "teacher_scores" not in row
        assert redrawn(row, 0, 0, 0, simans_width=0.05) is row and redrawn(row, 0, 1, 0) is not row


def test_training_on_teacher_rows_draws_seven_from_the_whole_pool_by_default(tiny_qwen3, answers, tmp_path):
    """The default for rows with teacher scores: 7 negatives per row, each epoch drawn by SimANS from all of the
    row's candidates; what the collator receives equals the `redrawn` oracle; an eval file's rows get 7 too."""
    from hfemb.training import collator as collator_module
    from hfemb.training.runner import run_training

    file_rows = [_row(i, answers, teacher=True) for i in range(24)]
    train_file = _write(tmp_path / "mined.jsonl", file_rows)
    eval_file = _write(tmp_path / "dev.jsonl", [_row(i, answers) for i in range(8)])  # no teacher, 2 negatives
    seen: list[tuple[str, list[str]]] = []
    original = collator_module.MultiNegCollator.__call__

    def spy(self, features):
        if features and "positive" in features[0]:
            seen.append((self.num_negatives, [(f["query"], f["negatives"]) for f in features],
                         all("teacher_scores" in f for f in features)))  # training rows (the eval file's have none)
        return original(self, features)

    collator_module.MultiNegCollator.__call__ = spy
    try:
        run_training(make_config(tiny_qwen3, train_file, tmp_path / "out",
                                 data={"eval_file": eval_file, "pool_negatives": None},
                                 training={"num_train_epochs": 2, "per_device_train_batch_size": 8,
                                           "eval_strategy": "epoch"}))
    finally:
        collator_module.MultiNegCollator.__call__ = original
    train = [f for n, batch, taught in seen if taught for f in batch]
    assert {n for n, _, _ in seen} == {7} and len(train) == 48  # 2 epochs x 24 rows; eval batches 7 wide too
    assert len(seen) > 6 and all(len(negatives) == 7 for _, batch, _ in seen for _, negatives in batch)
    rows, _ = rows_from_records(read_records(train_file).records, 2, seed=0, pool_negatives=7)
    index = {r["query"]: i for i, r in enumerate(rows)}
    width = DataConfig().redraw_simans_width
    for epoch, part in enumerate((train[:24], train[24:])):
        for q, negatives in part:
            assert negatives == redrawn(rows[index[q]], 0, epoch, index[q], simans_width=width)["negatives"]
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["data"]["negatives_per_row"] == 7 and summary["data"]["pool_negatives"] == 7
    card = (tmp_path / "out" / "merged" / "README.md").read_text()
    assert "in-batch + 7 negatives per query" in card
    assert "redrawn every epoch, the first too, from all of each row's candidates, pools and negatives together " \
           "(24 of 24 rows)" in card


def test_auto_stops_a_multi_dataset_run_whose_files_draw_different_counts(answers, tmp_path):
    """Auto draws 7 on a file of cosine teacher scores (SimANS) and 15 on one of reranker logits (uniform): one
    error names each file and its count, before the model loads (the model path does not exist). (A file with
    teacher scores beside one without is refused earlier, by check_teacher_scores' rule for datasets.)"""
    from hfemb.training.runner import run_training

    taught = [_row(i, answers, teacher=True) for i in range(6)]
    teacher = _write(tmp_path / "taught.jsonl", taught)
    logits = _write(tmp_path / "logits.jsonl", [{**r, "pos_scores": [5.0]} for r in taught])
    cfg = make_config(str(tmp_path / "no-model"), "", tmp_path / "o", data={
        "pool_negatives": None, "train_file": "", "train_files": [{"file": teacher}, {"file": logits}]})
    with pytest.raises(ConfigError, match=r"rows of \[7, 15\] negatives \(data\.pool_negatives auto draws 15 for "
                                          r"files with pools, 7 for rows drawn by SimANS; .*taught\.jsonl: 7, "
                                          r".*logits\.jsonl: 15\)"):
        run_training(cfg)
