"""hfemb.mining.bm25: tokenisers, token cache, and BM25 scores/rankings checked against rank_bm25.BM25Okapi."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
from rank_bm25 import BM25Okapi

from hfemb.mining import bm25 as bm25_mod
from hfemb.mining.bm25 import BM25, TokenizeStats, default_cache_dir, tokenize
from hfemb.errors import ConfigError


@pytest.fixture(scope="module")
def sample_tokens(zh_sample_csv):
    """jieba tokens of the embedded sample: (answers, queries) = (600 docs, 600 queries)."""
    df = pd.read_csv(zh_sample_csv)
    answers = tokenize(list(df.answer), "jieba", use_cache=False)
    queries = tokenize(list(df.title + "\n" + df.ask), "jieba", use_cache=False)
    return answers, queries


class LuceneIdfReference(BM25Okapi):
    """rank-bm25's BM25 with Lucene's idf, as the reference for idf_kind='lucene'."""

    def _calc_idf(self, nd):
        for word, freq in nd.items():
            self.idf[word] = math.log(1 + (self.corpus_size - freq + 0.5) / (freq + 0.5))


# ------------------------------------------------------------------------------------------ tokenisers
def test_tokenizers_on_known_text():
    assert tokenize(["我来到北京清华大学"], "jieba", use_cache=False) == [["我", "来到", "北京", "清华大学"]]
    # whitespace-only tokens (spaces, tabs, newlines, ideographic space) are dropped
    assert tokenize(["我 来到\t北京\n\u3000清华大学 "], "jieba", use_cache=False) == [["我", "来到", "北京", "清华大学"]]
    assert tokenize(["Hello, World! foo_bar 42x", ""], "regex", use_cache=False) == [
        ["hello", "world", "foo_bar", "42x"], []]
    assert tokenize(["高 血压!\n"], "char", use_cache=False) == [["高", "血", "压", "!"]]
    with pytest.raises(ConfigError, match="unknown tokenizer 'spacy'"):
        tokenize(["x"], "spacy")


def test_no_token_contains_a_space(zh_sample_csv):
    texts = list(pd.read_csv(zh_sample_csv).ask[:100]) + ["mixed English words and 中文 text  with   spaces"]
    for name in ("jieba", "regex", "char"):
        for doc in tokenize(texts, name, use_cache=False):
            assert all(tok and " " not in tok and not tok.isspace() for tok in doc)


def test_cache_second_run_does_not_retokenize(tmp_path, monkeypatch):
    texts = ["高血压能吃党参吗", "糖尿病 饮食", "", "English text here"]
    stats = TokenizeStats()
    first = tokenize(texts, "jieba", cache_dir=tmp_path, stats=stats)
    assert not stats.cache_hit and len(list(tmp_path.iterdir())) == 1

    def boom(texts):
        raise AssertionError("re-tokenised despite the cache")

    monkeypatch.setitem(bm25_mod._TOKENIZE, "jieba", boom)
    again = tokenize(texts, "jieba", cache_dir=tmp_path, stats=stats)
    assert stats.cache_hit and again == first and again[2] == []
    with pytest.raises(AssertionError, match="re-tokenised"):  # other texts, other tokeniser: other keys
        tokenize(texts[:3], "jieba", cache_dir=tmp_path)
    assert tokenize(texts, "char", cache_dir=tmp_path, stats=stats)[0][:2] == ["高", "血"]
    assert not stats.cache_hit


def test_cache_key_separates_texts_and_survives_corruption(tmp_path):
    a = tokenize(["ab", "c"], "regex", cache_dir=tmp_path)
    b = tokenize(["a", "bc"], "regex", cache_dir=tmp_path)  # same concatenation, different texts
    assert a == [["ab"], ["c"]] and b == [["a"], ["bc"]]
    for path in tmp_path.iterdir():
        path.write_text("{not json", encoding="utf-8")
    stats = TokenizeStats()
    assert tokenize(["ab", "c"], "regex", cache_dir=tmp_path, stats=stats) == a and not stats.cache_hit
    assert json.loads(open(stats.cache_path, encoding="utf-8").read()) == {"docs": ["ab", "c"]}


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HFEMB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tokens"
    monkeypatch.delenv("HFEMB_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "hfemb", "tokens")


def test_parallel_jieba_equals_serial(zh_sample_csv):
    df = pd.read_csv(zh_sample_csv)
    texts = list(df.answer) + list(df.ask)  # 1200 texts in 3 chunks
    serial = tokenize(texts, "jieba", use_cache=False, workers=1)
    stats = TokenizeStats()
    parallel = tokenize(texts, "jieba", use_cache=False, workers=2, parallel_min_texts=100, stats=stats)
    assert stats.workers == 2
    assert parallel == serial


# ----------------------------------------------------------------------------------------------- BM25
def _assert_same_scores(docs, queries, **kw):
    ref, ours = BM25Okapi(docs, **kw), BM25(docs, **kw)
    got = ours.score_batch(queries)
    for q, row in zip(queries, got):
        np.testing.assert_allclose(row, ref.get_scores(q), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours.get_scores(q), row, rtol=0, atol=1e-12)
    return ref, ours


def _assert_same_top_k(ref, ours, queries, k):
    ids, scores = ours.top_k(queries, k, batch_size=7)
    for q, row_ids, row_scores in zip(queries, ids, scores):
        full = ref.get_scores(q)
        best = np.sort(full)[::-1][:k]
        np.testing.assert_allclose(row_scores, best, atol=1e-6)  # same score multiset, best first
        np.testing.assert_allclose(full[row_ids], row_scores, atol=1e-6)  # ids carry those scores
        assert len(set(row_ids.tolist())) == len(row_ids)
        # every document strictly above the k-th score is returned (ties at the k-th place may differ)
        assert set(np.flatnonzero(full > best[-1] + 1e-9)) <= set(row_ids.tolist())


def test_scores_match_rank_bm25_on_real_chinese_sample(sample_tokens):
    answers, queries = sample_tokens
    ref, ours = _assert_same_scores(answers, queries[:120])
    _assert_same_top_k(ref, ours, queries[:120], 10)
    # the idf table itself, including the epsilon floor of very common terms (punctuation, 的)
    idf = np.array([ref.idf[t] for t in ours.vocab])
    np.testing.assert_allclose(ours.idf, idf, atol=1e-12)
    assert (ours.doc_freq > len(answers) / 2).any()
    assert ours.avgdl == pytest.approx(ref.avgdl)


def _random_corpus(seed):
    """Random docs plus: "half" in exactly half of all documents (okapi idf 0), "most" in every non-empty
    one (negative idf, floored to epsilon * mean idf), "all", and two empty documents."""
    rng = random.Random(seed)
    n = rng.choice([8, 20, 50])
    docs = [[f"w{rng.randint(0, 40)}" for _ in range(rng.randint(1, 15))] + ["most"] for _ in range(n)]
    for i in range((n + 2) // 2):
        docs[i].append("half")
    docs[n // 3].insert(0, "all")
    docs[3:3] = [[]]
    docs.append([])
    queries = [[], ["nope"], ["half"], ["most", "most"], ["all"], ["w1", "w1", "w1", "half", "nope", "most"]]
    queries += [[f"w{rng.randint(0, 45)}" for _ in range(rng.randint(1, 6))] for _ in range(30)]
    return docs, queries


@pytest.mark.parametrize("seed", range(6))
def test_scores_match_rank_bm25_on_random_corpora(seed):
    docs, queries = _random_corpus(seed)
    kw = [{}, {"k1": 1.2, "b": 0.5, "epsilon": 0.1}, {"k1": 0.9, "b": 0.99, "epsilon": 0.5}][seed % 3]
    ref, ours = _assert_same_scores(docs, queries, **kw)
    _assert_same_top_k(ref, ours, queries, 5)
    assert sum("half" in d for d in docs) * 2 == len(docs)
    assert ours.idf[ours.vocab["half"]] == 0.0 == ref.idf["half"]
    assert not ours.get_scores(["half"]).any()
    assert ours.idf[ours.vocab["most"]] == pytest.approx(ref.epsilon * ref.average_idf, abs=1e-12)
    assert ref.average_idf > 0 and ours.doc_freq[ours.vocab["most"]] * 2 > len(docs)
    assert not ours.get_scores([]).any() and not ours.get_scores(["nope"]).any()
    # a repeated query token counts again, as in rank-bm25
    np.testing.assert_allclose(ours.get_scores(["w1", "w1"]), 2 * ours.get_scores(["w1"]))


@pytest.mark.parametrize("seed", range(3))
def test_lucene_idf_matches_its_reference_and_is_positive(seed, sample_tokens):
    docs, queries = _random_corpus(seed) if seed else (sample_tokens[0], sample_tokens[1][:40])
    ref = LuceneIdfReference(docs)
    ours = BM25(docs, idf_kind="lucene")
    for q in queries:
        np.testing.assert_allclose(ours.get_scores(q), ref.get_scores(q), atol=1e-6)
    assert (ours.idf > 0).all()
    assert np.all(np.diff(ours.idf[np.argsort(ours.doc_freq, kind="stable")]) <= 1e-12)  # rarer counts more
    if seed:
        assert ours.get_scores(["half"]).any()  # okapi gives this term nothing


def test_empty_documents_with_b_1_score_0_where_rank_bm25_gives_nan():
    docs, queries = _random_corpus(0)
    ref, ours = BM25Okapi(docs, b=1.0), BM25(docs, b=1.0)
    for q in queries:
        with np.errstate(invalid="ignore"):
            expected = ref.get_scores(q)  # 0 * (k1 + 1) / (0 + k1 * (1 - 1 + 0)) = nan for empty documents
        empty = np.array([not d for d in docs])
        assert np.isnan(expected[empty]).all() == bool(q)  # even for unknown terms: 0 * nan
        np.testing.assert_allclose(ours.get_scores(q), np.nan_to_num(expected, nan=0.0), atol=1e-6)


def test_score_documents_uses_corpus_statistics():
    docs, queries = _random_corpus(1)
    ref, ours = BM25Okapi(docs), BM25(docs)
    q = ["w1", "w2", "w2", "half", "nope"]
    np.testing.assert_allclose(ours.score_documents(q, docs), ref.get_scores(q), atol=1e-9)
    new = ["w2", "w2", "half", "unseen", "w1"]
    expected = sum(ref.idf.get(t, 0) * new.count(t) * 2.5 / (new.count(t) + 1.5 * (0.25 + 0.75 * 5 / ref.avgdl))
                   for t in q)
    assert ours.score_documents(q, [new])[0] == pytest.approx(expected, abs=1e-12)


def test_degenerate_corpora():
    with pytest.raises(ConfigError, match="at least one document"):
        BM25([])
    with pytest.raises(ConfigError, match="unknown idf"):
        BM25([["a"]], idf_kind="bm42")
    empty = BM25([[], []])  # rank-bm25 divides by zero here; no terms means every score is 0
    assert empty.get_scores(["a"]).tolist() == [0.0, 0.0]
    assert empty.top_k([["a"]], 5)[0].shape == (1, 2)
