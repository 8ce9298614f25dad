"""Optional FAISS search: IndexFlatIP top-k vs the exact blocked search and a float64 brute force (ties
included), HNSW recall, the missing-package error, and `hfemb eval --search faiss` end to end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from hfemb.errors import ConfigError
from hfemb.evaluation.retrieval import exact_search


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _corpus_with_ties(rng):
    """500 random unit vectors and 100 exact copies of some of them at later positions (tied scores)."""
    base = _unit(rng, 500, 24)
    copies = rng.choice(500, size=100, replace=False)
    return np.concatenate([base, base[copies]])


@pytest.mark.parametrize("k", [1, 10, 100])
def test_faiss_flat_equals_exact_search_with_ties(k):
    pytest.importorskip("faiss")
    from hfemb.evaluation.faiss_search import faiss_search

    rng = np.random.default_rng(0)
    corpus = _corpus_with_ties(rng)
    queries = np.concatenate([_unit(rng, 40, 24), corpus[[3, 510, 599]]])  # some queries are corpus rows
    f_scores, f_idx = faiss_search(queries, corpus, k)
    e_scores, e_idx = exact_search(queries, corpus, k)
    assert f_idx.shape == e_idx.shape == (len(queries), k) and f_idx.dtype == np.int64
    np.testing.assert_allclose(f_scores, e_scores, atol=1e-5)
    full = queries.astype(np.float64) @ corpus.T.astype(np.float64)  # the oracle
    np.testing.assert_allclose(np.take_along_axis(full, f_idx, 1), e_scores, atol=1e-5)
    n_tied_groups = 0
    for qi in range(len(queries)):
        row = full[qi]
        kth = np.sort(row)[::-1][k - 1]
        assert len(set(f_idx[qi].tolist())) == k
        for r in range(k):
            if f_idx[qi, r] != e_idx[qi, r]:  # only where the two scores tie (up to float32 rounding)
                assert abs(row[f_idx[qi, r]] - row[e_idx[qi, r]]) < 1e-5
            copies = np.flatnonzero((corpus == corpus[e_idx[qi, r]]).all(axis=1))  # exact ties: equal vectors
            if len(copies) > 1 and r == np.flatnonzero(np.isin(e_idx[qi], copies)).min() \
                    and row[copies[0]] > kth + 1e-5:  # a tie group wholly inside the top k: corpus order in both
                n_tied_groups += 1
                for got in (e_idx[qi], f_idx[qi]):
                    assert got[np.isin(got, copies)].tolist() == copies.tolist()
    if k == 100:
        assert n_tied_groups > 10  # the duplicates really produced ties inside the top k


def test_faiss_hnsw_recall_against_exact():
    pytest.importorskip("faiss")
    from hfemb.evaluation.faiss_search import faiss_search

    rng = np.random.default_rng(1)
    corpus, queries = _unit(rng, 5000, 32), _unit(rng, 50, 32)
    _, h_idx = faiss_search(queries, corpus, 10, kind="faiss-hnsw")
    _, e_idx = exact_search(queries, corpus, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(h_idx.tolist(), e_idx.tolist())])
    assert recall >= 0.95  # approximate: measured 1.0 here; not guaranteed in general


def test_faiss_not_installed_is_one_clear_error(monkeypatch):
    from hfemb.data.beir import RetrievalSet
    from hfemb.evaluation.faiss_search import faiss_search
    from hfemb.evaluation.retrieval import evaluate_retrieval
    from hfemb.evaluation.settings import EvalSettings

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(ConfigError, match=r"needs the faiss package: pip install 'hfemb\[faiss\]'"):
        faiss_search(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), 2)
    rset = RetrievalSet(["d"], ["doc"], ["q"], ["query"], {"q": {"d": 1}})
    with pytest.raises(ConfigError, match="needs the faiss package"):  # before any model loads (this one does not exist)
        evaluate_retrieval({"m": "/no/such/model"}, rset, settings=EvalSettings(search="faiss", show_progress=False))
    with pytest.raises(ConfigError, match="search must be exact, faiss or faiss-hnsw"):
        EvalSettings(search="ivf")


def test_eval_cli_search_faiss_equals_exact(tmp_path, tiny_qwen3):
    pytest.importorskip("faiss")
    from hfemb.cli import main

    rng = np.random.default_rng(0)
    words = ["rain", "snow", "cat", "dog", "tea", "river", "stone", "lamp", "bread", "wind"]
    docs = [" ".join(rng.choice(words, 4)) for _ in range(60)]
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"query": " ".join(rng.choice(words, 2)), "positive": [docs[i]]})
                              for i in range(0, 60, 3)) + "\n", encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    reports = {}
    for search in ("exact", "faiss"):
        out = tmp_path / search
        assert main(["eval", "--data", str(data), "--corpus", str(corpus), "--model", f"t={tiny_qwen3}",
                     "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--bootstrap",
                     "0", "--no-plots", "--search", search]) == 0
        reports[search] = json.loads((out / "results.json").read_text())["models"]["t"]
    assert reports["faiss"]["search"] == "faiss" and reports["exact"]["search"] == "exact"
    for metric in ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100"):
        assert reports["faiss"]["retrieval"][metric] == pytest.approx(reports["exact"]["retrieval"][metric], abs=1e-9)
