"""hfemb.mining.mine: selection on hand-built rankings, and the mine pipeline checked against rank-bm25."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from hfemb.mining.bm25 import tokenize
from hfemb.data.formats import read_records
from hfemb.data.records import Record
from hfemb.errors import ConfigError, HfembError
from hfemb.mining.mine import (MiningConfig, merge_shards, mine, normalize_text, rank_candidates, report_path,
                          select_negatives, shard_bounds, write_output)


def _select(n, seed=0, scores=None, **kw):
    kw = {"num_negatives": 3, "num_hard": 1, "hard_top_k": 10, "easy_bottom_k": 10, **kw}
    ids = [f"d{i}" for i in range(n)]  # ranked best first
    scores = list(np.linspace(100, 1, n)) if scores is None else scores
    return select_negatives(ids, scores, np.random.default_rng(seed), **kw)


def _ranks(sel):
    return [int(i[1:]) for i in sel.ids]


# ------------------------------------------------------------------------------------------ selection
def test_default_selection_one_hard_two_easy():
    for seed in range(20):
        sel = _select(30, seed)
        hard, e1, e2 = _ranks(sel)
        assert sel.kinds == ["hard", "easy", "easy"] and sel.drop_reason is None
        assert 0 <= hard < 10 and 20 <= e1 < e2 < 30
        assert sel.scores == pytest.approx(list(np.linspace(100, 1, 30)[_ranks(sel)]))
    assert _select(30, 5).ids == _select(30, 5).ids  # deterministic for a generator state
    assert len({tuple(_select(30, s).ids) for s in range(20)}) > 10


def test_skip_top_and_pool_sizes():
    assert all(2 <= _ranks(_select(30, s, skip_top=2))[0] < 12 for s in range(20))
    sel = _select(30, 0, num_negatives=6, num_hard=2, hard_top_k=3, easy_bottom_k=4)
    ranks = _ranks(sel)
    assert sel.kinds == ["hard"] * 2 + ["easy"] * 4 and all(r < 3 for r in ranks[:2]) and ranks[2:] == [26, 27, 28, 29]


def test_small_pools_never_overlap_or_repeat():
    sel = _select(12, 0, num_negatives=4, num_hard=1)  # hard = ranks 0..9, easy = the remaining 10, 11
    assert sel.kinds == ["hard", "hard", "easy", "easy"] and _ranks(sel)[2:] == [10, 11]
    sel = _select(5, 0)  # everything fits in the hard window: easy is empty, more hard ones instead
    assert sel.kinds == ["hard"] * 3 and len(set(sel.ids)) == 3
    sel = _select(10, 0, num_negatives=4, hard_top_k=1, easy_bottom_k=1)  # then random ones from the middle
    assert sel.kinds == ["hard", "easy", "random", "random"]
    assert _ranks(sel)[:2] == [0, 9] and all(1 <= r <= 8 for r in _ranks(sel)[2:])
    sel = _select(4, 0, num_negatives=3, num_hard=3, hard_top_k=1, easy_bottom_k=10)  # hard short -> easy
    assert sel.kinds == ["hard", "easy", "easy"]
    rng = np.random.default_rng(0)
    for _ in range(300):  # property: exactly num_negatives distinct candidates, or a drop
        n, k = int(rng.integers(0, 15)), int(rng.integers(1, 6))
        kw = dict(num_negatives=k, num_hard=int(rng.integers(0, k + 1)), hard_top_k=int(rng.integers(0, 6)),
                  easy_bottom_k=int(rng.integers(0, 6)), skip_top=int(rng.integers(0, 3)))
        sel = _select(n, int(rng.integers(1000)), **kw)
        if n - min(n, kw["skip_top"]) >= k:
            assert len(sel.ids) == k == len(set(sel.ids)) and sel.drop_reason is None
            assert min(_ranks(sel)) >= kw["skip_top"]
        else:
            assert sel.ids == [] and sel.drop_reason == "too_few_negatives"


def test_max_score_drops_likely_false_negatives():
    scores = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]
    sel = _select(8, 0, scores=scores, hard_top_k=2, easy_bottom_k=2, max_score=8.5)
    assert sel.score_filtered == 2 and all(s <= 8.5 for s in sel.scores) and 2 <= _ranks(sel)[0] <= 3
    sel = _select(8, 0, scores=scores, hard_top_k=2, easy_bottom_k=2, max_score=8.5, skip_top=3)
    assert sel.score_filtered == 0 and 3 <= _ranks(sel)[0] <= 4  # already skipped: not counted twice
    sel = _select(8, 0, scores=scores, max_score=4.5)  # only 2 candidates left after the filter
    assert sel.drop_reason == "max_relative_score" and sel.score_filtered == 6


def test_rank_candidates_ties_random_partial_equals_full():
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 200))
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        head, tail = int(rng.integers(0, 20)), int(rng.integers(0, 20))
        full = rank_candidates(scores, np.random.default_rng(trial))
        part = rank_candidates(scores, np.random.default_rng(trial), head, tail)
        assert sorted(full.tolist()) == sorted(part.tolist()) == list(range(n))
        assert np.all(np.diff(scores[full]) <= 0)
        h, t = min(head, n), min(tail, n - min(head, n))
        np.testing.assert_array_equal(scores[part[:h]], scores[full[:h]])  # same score sequence at both ends
        np.testing.assert_array_equal(scores[part[n - t:]], scores[full[n - t:]])
    tied = np.zeros(1000)  # the easy end of a corpus is mostly score 0: ties must be broken at random
    tails = {tuple(rank_candidates(tied, np.random.default_rng(s), 5, 5)[-5:]) for s in range(10)}
    assert len(tails) == 10


def test_normalize_text_and_shard_bounds():
    assert normalize_text("少吃盐， 多运动！") == normalize_text("少吃盐多运动") == "少吃盐多运动"
    assert normalize_text("Ｈello,  World\n") == "helloworld"
    assert [shard_bounds(10, 3, i) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_config_validation():
    for bad in ({"mode": "both"}, {"num_hard": 4}, {"num_negatives": 0}, {"skip_top": -1}, {"idf": "x"},
                {"max_relative_score": 0}, {"num_shards": 2, "shard_index": 2}, {"tokenizer": "nltk"},
                {"hard_top_k": 0}, {"k1": -1}, {"b": 2}, {"epsilon": -1}, {"workers": 0}):
        with pytest.raises(ConfigError):
            MiningConfig(**bad)


# --------------------------------------------------------------------------------- mining, real sample
@pytest.fixture(scope="module")
def sample(zh_sample_csv, tmp_path_factory):
    records = read_records(zh_sample_csv).records
    cache = str(tmp_path_factory.mktemp("tokens"))
    corpus = list(dict.fromkeys(p for r in records for p in r.positives))
    ref = BM25Okapi(tokenize(corpus, "jieba", cache_dir=cache))
    return records, cache, corpus, ref


def _irrelevant(record, corpus):
    own = {normalize_text(p) for p in record.positives}
    return np.array([i for i, d in enumerate(corpus) if normalize_text(d) not in own])


def test_corpus_mining_matches_rank_bm25(sample):
    records, cache, corpus, ref = sample
    result = mine(records, MiningConfig(cache_dir=cache))
    rep = result.report
    assert len(result.rows) == rep["rows_written"] == 600 and rep["rows_dropped"] == {
        "too_few_negatives": 0, "max_relative_score": 0}
    assert rep["negatives"] == {"hard": 600, "easy": 1200, "random": 0}
    assert rep["documents"] == len(corpus) == 599 and rep["excluded"]["own_positive"] == 600
    assert rep["tokenization"]["cache_hits"] == 1  # the corpus was tokenised by the fixture
    doc_id = {d: i for i, d in enumerate(corpus)}
    q_tokens = tokenize([r.query for r in records[:80]], "jieba", cache_dir=cache)
    for record, row, qt in zip(records[:80], result.rows, q_tokens):
        scores = ref.get_scores(qt)
        assert row["query"] == record.query and row["positive"] == record.positives[0]
        assert row["mining"]["kinds"] == ["hard", "easy", "easy"]
        assert row["mining"]["positive_bm25"] == pytest.approx(scores[doc_id[row["positive"]]], abs=1e-6)
        assert row["mining"]["bm25"] == pytest.approx([scores[doc_id[n]] for n in row["negative"]], abs=1e-6)
        irrelevant = np.sort(scores[_irrelevant(record, corpus)])
        hard, easy1, easy2 = row["mining"]["bm25"]
        assert hard >= irrelevant[-10] - 1e-9 and max(easy1, easy2) <= irrelevant[9] + 1e-9
        assert normalize_text(row["positive"]) not in {normalize_text(n) for n in row["negative"]}
    again = mine(records, MiningConfig(cache_dir=cache))
    assert again.rows == result.rows
    other = mine(records, MiningConfig(cache_dir=cache, seed=7))
    assert sum(a != b for a, b in zip(other.rows, result.rows)) > 300


def test_max_relative_score_and_skip_top(sample):
    records, cache, corpus, ref = sample
    result = mine(records[:200], MiningConfig(cache_dir=cache, max_relative_score=0.8, skip_top=2,
                                              num_negatives=4, num_hard=2))
    assert result.report["score_filtered_candidates"] > 0
    doc_id = {d: i for i, d in enumerate(dict.fromkeys(p for r in records[:200] for p in r.positives))}
    sub = list(doc_id)
    sub_ref = BM25Okapi(tokenize(sub, "jieba", cache_dir=cache))
    q_tokens = tokenize([r.query for r in records[:200]], "jieba", cache_dir=cache)
    rows = iter(result.rows)
    row = next(rows)
    checked = 0
    for record, qt in zip(records[:200], q_tokens):
        if (row["query"], row["positive"]) != (record.query, record.positives[0]):
            continue  # this row was dropped (max_relative_score left too few candidates)
        checked += 1
        pos = row["mining"]["positive_bm25"]
        if pos > 0:
            assert max(row["mining"]["bm25"]) <= 0.8 * pos + 1e-9
        scores = sub_ref.get_scores(qt)
        top2 = np.sort(scores[_irrelevant(record, sub)])[-2:]
        for kind, s in zip(row["mining"]["kinds"], row["mining"]["bm25"]):
            if kind == "hard" and (pos <= 0 or top2[0] <= 0.8 * pos):
                assert s <= top2[0] + 1e-9  # the two best irrelevant ones were skipped
        row = next(rows, {"query": None, "positive": None})
    assert checked == len(result.rows) == 200 - result.report["rows_dropped"]["max_relative_score"]


def test_shards_equal_full_run_and_merge(sample, tmp_path):
    records, cache, _, _ = sample
    records = records[:150]
    full = mine(records, MiningConfig(cache_dir=cache))
    paths = []
    for i in (2, 0, 1):
        part = mine(records, MiningConfig(cache_dir=cache, num_shards=3, shard_index=i))
        assert part.report["queries"] == 50 and part.report["shard"]["query_start"] == 50 * i
        assert part.rows == full.rows[50 * i:50 * (i + 1)]  # same negatives in a shard as in the full run
        write_output(part, tmp_path / f"shard{i}.jsonl")
        paths.append(tmp_path / f"shard{i}.jsonl")
    merged = merge_shards(paths, tmp_path / "merged.jsonl")
    rows = [json.loads(line) for line in open(tmp_path / "merged.jsonl", encoding="utf-8")]
    assert rows == full.rows and merged["rows_written"] == 150 and merged["queries"] == 150
    assert merged["negatives"] == full.report["negatives"]
    assert json.loads(report_path(tmp_path / "merged.jsonl").read_text(encoding="utf-8")) == merged

    with pytest.raises(HfembError, match=r"shards \[0, 1\] given, expected each of 0..2"):
        merge_shards(paths[1:], tmp_path / "x.jsonl")
    with pytest.raises(HfembError, match="expected each of 0..2 exactly once"):
        merge_shards(paths + paths[:1], tmp_path / "x.jsonl")
    write_output(mine(records, MiningConfig(cache_dir=cache, num_shards=3, seed=1)), tmp_path / "seed1.jsonl")
    with pytest.raises(HfembError, match=r"different settings than .* \(seed\)"):
        merge_shards([tmp_path / "seed1.jsonl", *paths[1:]], tmp_path / "x.jsonl")
    write_output(mine(records[:149], MiningConfig(cache_dir=cache, num_shards=3)), tmp_path / "other.jsonl")
    with pytest.raises(HfembError, match="different input"):
        merge_shards([tmp_path / "other.jsonl", *paths[1:]], tmp_path / "x.jsonl")
    text = paths[0].read_text(encoding="utf-8")
    paths[0].write_text(text[:len(text) // 2], encoding="utf-8")  # cut off mid-row
    with pytest.raises(HfembError, match=rf"shard2.jsonl:\d+: invalid JSON"):
        merge_shards(paths, tmp_path / "x.jsonl")
    paths[0].write_text("", encoding="utf-8")
    with pytest.raises(HfembError, match="0 rows but its report says 50"):
        merge_shards(paths, tmp_path / "x.jsonl")
    report_path(paths[0]).write_text("[1]", encoding="utf-8")
    with pytest.raises(HfembError, match="not a shard report"):
        merge_shards(paths, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------------------ exclusions, pool mode
FILLER = ["多喝水早睡觉", "按时吃药复查", "低盐低脂饮食", "适量运动减肥", "戒烟限酒", "保持心情愉快", "定期测血压"]


def test_corpus_mode_excludes_positives_duplicates_same_query_and_query_text():
    records = [Record("高血压吃什么", ["少吃盐。"]), Record("糖尿病怎么办", ["少吃 盐"]),
               Record("高血压，吃什么？", ["多运动"])] + [Record(f"问题{i}", [t]) for i, t in enumerate(FILLER)]
    cfg = MiningConfig(tokenizer="char", num_negatives=7, num_hard=0, use_cache=False)
    result = mine(records, cfg)
    assert len(result.rows) == 10  # 10 documents, at most 3 excluded per query: 7 negatives are enough
    banned = [{"少吃盐。", "少吃 盐", "多运动"}, {"少吃盐。", "少吃 盐"}, {"少吃盐。", "少吃 盐", "多运动"}]
    for row, bad in zip(result.rows, banned):
        assert not bad & set(row["negative"]) and len(row["negative"]) == 7 and row["mining"]["mode"] == "corpus"
    assert result.rows[1]["negative"].count("多运动") == 1
    # own exact: every record once; normalised twins: 少吃 盐 for record 0, 少吃盐。 for record 1;
    # same query: 多运动 for record 0, both salt answers for record 2
    assert result.report["excluded"] == {"own_positive": 10, "normalized_duplicate": 2,
                                         "same_query_positive": 3, "query_text": 0}
    assert mine(records, MiningConfig(tokenizer="char", num_negatives=8, use_cache=False)).report[
        "rows_dropped"]["too_few_negatives"] == 2
    with_query = mine(records, cfg, corpus=FILLER + ["少吃盐", "糖尿病怎么办！"] + FILLER[:3])
    assert with_query.report["documents"] == 9  # exact duplicates of the corpus are dropped
    assert all(len(set(r["negative"])) == 7 for r in with_query.rows)
    assert "糖尿病怎么办！" not in with_query.rows[1]["negative"]
    assert with_query.report["excluded"]["query_text"] == 1 and with_query.report["corpus"] == "file"
    # a positive outside the given corpus is scored with the corpus statistics
    ref = BM25Okapi(tokenize(FILLER + ["少吃盐", "糖尿病怎么办！"], "char", use_cache=False))
    q = tokenize(["高血压吃什么"], "char", use_cache=False)[0]
    dl = len("少吃盐。")  # 4 char tokens; only 吃 is shared with the query
    expected = sum(ref.idf.get(t, 0) * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * dl / ref.avgdl)) for t in q if t in "少吃盐。")
    assert expected > 0
    assert with_query.rows[0]["mining"]["positive_bm25"] == pytest.approx(expected)


def _pool(query, positives, negatives):
    cands = [(p, 1) for p in positives] + [(n, 0) for n in negatives]
    return Record(query, list(positives), list(negatives), candidates=cands)


def test_pool_mode_ranks_own_candidates_with_global_statistics():
    records = [_pool("blood pressure diet", ["eat less salt"],
                     ["blood pressure pills daily", "salt diet for blood pressure", "weather today",
                      "football scores", "eat fruit"]),
               _pool("diabetes diet", ["eat less sugar"], ["diabetes pills", "sugar free diet", "music"]),
               _pool("tiny pool", ["yes"], ["no"])]
    cfg = MiningConfig(mode="pool", tokenizer="regex", num_negatives=3, num_hard=1, hard_top_k=2,
                       easy_bottom_k=2, use_cache=False)
    result = mine(records, cfg)
    assert result.report["rows_dropped"]["too_few_negatives"] == 1 and len(result.rows) == 2
    docs = list(dict.fromkeys(t for r in records for t in (*r.positives, *r.negatives)))
    ref = BM25Okapi(tokenize(docs, "regex", use_cache=False))
    for record, row in zip(records, result.rows):
        assert set(row["negative"]) <= set(record.negatives) and row["mining"]["mode"] == "pool"
        scores = dict(zip(docs, ref.get_scores(tokenize([record.query], "regex", use_cache=False)[0])))
        assert row["mining"]["bm25"] == pytest.approx([scores[n] for n in row["negative"]])
        ranked = sorted(record.negatives, key=lambda d: -scores[d])
        # hard from the top 2, easy from the bottom 2 -- ties at a boundary may go either way
        assert scores[row["negative"][0]] >= scores[ranked[1]]
        assert all(scores[n] <= scores[ranked[-2]] for n in row["negative"][1:])
    assert result.rows[0]["negative"][0] in {"salt diet for blood pressure", "blood pressure pills daily"}
    with pytest.raises(ConfigError, match="pool mode needs"):
        mine([Record("q", ["p"])], MiningConfig(mode="pool", use_cache=False))
    with pytest.raises(ConfigError, match="only used in corpus mode"):
        mine(records, cfg, corpus=["x"])


def test_real_short_qa_near_duplicate_answers_are_excluded(shared_data):
    records = read_records(shared_data / "zh_medical_qa" / "internal_medicine_qa_short.txt", fmt="qa_blocks").records
    result = mine(records, MiningConfig(tokenizer="char", use_cache=False))
    corpus = list(dict.fromkeys(r.positives[0] for r in records))
    per_norm = Counter(normalize_text(d) for d in corpus)
    expected = sum(per_norm[normalize_text(r.positives[0])] - 1 for r in records)
    assert len(records) == 4048 and len(result.rows) == 4048
    assert expected > 0 and result.report["excluded"]["normalized_duplicate"] == expected
    for row in result.rows:
        assert normalize_text(row["positive"]) not in {normalize_text(n) for n in row["negative"]}
        assert len(set(row["negative"])) == 3


def test_rows_carry_their_hard_and_easy_pools_ranked_by_rank_bm25():
    records = [_pool("blood pressure diet", ["eat less salt"],
                     ["blood pressure pills daily", "salt diet for blood pressure", "blood tests", "weather today",
                      "football scores", "eat fruit", "pressure cooker"]),
               _pool("diabetes diet", ["eat less sugar"], ["diabetes pills", "sugar free diet", "music"])]
    cfg = MiningConfig(mode="pool", tokenizer="regex", num_negatives=3, num_hard=1, hard_top_k=3,
                       easy_bottom_k=3, use_cache=False)
    rows = mine(records, cfg).rows
    docs = list(dict.fromkeys(t for r in records for t in (*r.positives, *r.negatives)))
    ref = BM25Okapi(tokenize(docs, "regex", use_cache=False))
    big = rows[0]
    scores = dict(zip(docs, ref.get_scores(tokenize([records[0].query], "regex", use_cache=False)[0])))
    pools = big["negative_candidates"]
    assert set(pools) == {"hard", "easy"} and len(pools["hard"]) == 3 and len(pools["easy"]) == 3
    assert not set(pools["hard"]) & set(pools["easy"]) and "eat less salt" not in pools["hard"] + pools["easy"]
    # the hard pool is a top 3 by rank-bm25, the easy pool a bottom 3 of the rest (ties may go either way)
    rest = [d for d in records[0].negatives if d not in pools["hard"]]
    middle = [d for d in rest if d not in pools["easy"]]
    assert min(scores[d] for d in pools["hard"]) >= max(scores[d] for d in rest)
    assert max(scores[d] for d in pools["easy"]) <= min(scores[d] for d in middle) and len(middle) == 1
    for neg, kind in zip(big["negative"], big["mining"]["kinds"]):
        assert neg in pools[kind]
    # 3 negatives in a pool of 3: every one is drawn, nothing to redraw, no pools written
    assert "negative_candidates" not in rows[1]
    off = mine(records, dataclasses.replace(cfg, candidates=False)).rows
    assert "negative_candidates" not in off[0] and off[0]["negative"] == big["negative"]
