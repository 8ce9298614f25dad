"""Corpus retrieval: exact search vs brute force, metrics vs sklearn and hand computations (pytrec_eval
conventions), the top-k threshold sweep, the BEIR reader and `run_eval.py --data BEIR_DIR` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hfemb.data.beir import read_beir, retrieval_set_from_records
from hfemb.data.formats import Record
from hfemb.errors import DataError
from hfemb.evaluation import retrieval_metrics as rm
from hfemb.evaluation.retrieval import exact_search, qrels_by_index


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("k", [1, 5, 37, 100])
def test_exact_search_equals_brute_force(k):
    rng = np.random.default_rng(0)
    q, c = _unit(rng, 23, 16), _unit(rng, 37, 16)
    scores, idx = exact_search(q, c, k, query_block=4, corpus_block=6)  # many blocks, ragged last ones
    full = q.astype(np.float64) @ c.T.astype(np.float64)
    want = np.argsort(-full, axis=1, kind="stable")[:, :min(k, 37)]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), atol=1e-6)


def test_exact_search_ties_keep_corpus_order():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    c = np.array([[0.9, 0], [0.5, 0], [0.5, 0], [0.1, 0], [0.3, 0], [0.5, 0]], dtype=np.float32)
    _, idx = exact_search(q, c, 6, corpus_block=2)
    assert idx.tolist() == [[0, 1, 2, 5, 4, 3]]


# ----------------------------------------------------------------------------------------- metrics
def test_ndcg_equals_sklearn_graded():
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(1)
    n_q, n_d = 40, 60
    scores = rng.random((n_q, n_d))  # distinct: no ties
    grades = rng.choice([0, 0, 0, 0, 1, 2, 3], size=(n_q, n_d))
    ranked = np.argsort(-scores, axis=1)
    qrels = [{d: int(g) for d, g in enumerate(row) if g > 0} for row in grades]
    per_q = rm.per_query_metrics(ranked, qrels, n_d)
    for i in range(n_q):
        if grades[i].max() == 0:
            assert math.isnan(per_q["ndcg@10"][i])
            continue
        assert per_q["ndcg@10"][i] == pytest.approx(ndcg_score(grades[i:i + 1], scores[i:i + 1], k=10), abs=1e-12)


def test_binary_metrics_brute_force():
    """Recall@k, MRR@10, MAP@100 against plain-Python definitions (trec_eval's)."""
    rng = np.random.default_rng(2)
    n_q, n_d = 30, 150
    ranked = np.argsort(-rng.random((n_q, n_d)), axis=1)[:, :100]
    qrels = [{int(d): int(rng.integers(0, 3)) for d in rng.choice(n_d, size=rng.integers(0, 8), replace=False)}
             for _ in range(n_q)]
    per_q = rm.per_query_metrics(ranked, qrels, n_d, label_threshold=1)
    for i in range(n_q):
        rel = {d for d, g in qrels[i].items() if g >= 1}
        if not rel:
            assert all(math.isnan(v[i]) for v in per_q.values())
            continue
        hits = [int(d) in rel for d in ranked[i]]
        for k in (1, 5, 10, 100):
            assert per_q[f"recall@{k}"][i] == pytest.approx(sum(hits[:k]) / len(rel))
        first = next((r for r, h in enumerate(hits[:10]) if h), None)
        assert per_q["mrr@10"][i] == pytest.approx(0 if first is None else 1 / (first + 1))
        ap = sum(sum(hits[:r + 1]) / (r + 1) for r in range(100) if hits[r]) / len(rel)
        assert per_q["map@100"][i] == pytest.approx(ap)


def test_hand_built_ranking_with_ties_graded_and_unretrievable():
    """Scores 0.9, 0.5, 0.5, 0.1, 0.3 (docs 1 and 2 tie: corpus order); grades doc2=2, doc3=1, doc0=0; and a
    judged document (grade 1) missing from the corpus, which counts in the ideal DCG and the recall denominator
    (pytrec_eval)."""
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    c = np.array([[0.9, 0], [0.5, 0], [0.5, 0], [0.1, 0], [0.3, 0]], dtype=np.float32)
    _, ranked = exact_search(q, c, 5)
    assert ranked.tolist() == [[0, 1, 2, 4, 3]]
    qrels = [{2: 2, 3: 1, 0: 0}]
    m = rm.per_query_metrics(ranked, qrels, 5)
    dcg = 2 / math.log2(4) + 1 / math.log2(6)
    assert m["ndcg@10"][0] == pytest.approx(dcg / (2 + 1 / math.log2(3)))
    assert m["mrr@10"][0] == pytest.approx(1 / 3)
    assert (m["recall@1"][0], m["recall@5"][0]) == (0.0, 1.0)
    assert m["map@100"][0] == pytest.approx((1 / 3 + 2 / 5) / 2)
    m2 = rm.per_query_metrics(ranked, [{2: 2, 3: 1, 0: 0, -1: 1}], 5)
    assert m2["ndcg@10"][0] == pytest.approx(dcg / (2 + 1 / math.log2(3) + 1 / math.log2(4)))
    assert m2["recall@5"][0] == pytest.approx(2 / 3)
    assert m2["map@100"][0] == pytest.approx((1 / 3 + 2 / 5) / 3)
    # label_threshold 2: only doc 2 is relevant for the binary metrics; nDCG gains stay graded
    m3 = rm.per_query_metrics(ranked, qrels, 5, label_threshold=2)
    assert m3["recall@1"][0] == 0 and m3["mrr@10"][0] == pytest.approx(1 / 3)
    assert m3["ndcg@10"][0] == pytest.approx(m["ndcg@10"][0])


def test_topk_sweep_and_best_f1_brute_force():
    rng = np.random.default_rng(3)
    scores = np.sort(rng.random((25, 10)), axis=1)[:, ::-1]
    scores[3, 4] = scores[3, 3]  # a tie
    hit = rng.random((25, 10)) < 0.3
    n_rel = hit.sum(axis=1) + rng.integers(0, 2, size=25)  # some relevant documents not retrieved
    keep = n_rel > 0
    scores, hit, n_rel = scores[keep], hit[keep], n_rel[keep]
    best = rm.topk_best_f1(scores, hit, n_rel)
    total = n_rel.sum()
    brute = []
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp = (pred & hit).sum(), (pred & ~hit).sum()
        brute.append((2 * tp / (2 * tp + fp + (total - tp)), t))
    f1, t = max(brute, key=lambda x: (x[0], x[1]))
    assert best["f1"] == pytest.approx(f1) and best["threshold"] == t
    (row,) = rm.topk_sweep(scores, hit, n_rel, [t])
    assert row["f1"] == pytest.approx(f1)
    assert row["fn"] == total - row["tp"]



def test_topk_bagged_threshold_is_the_median_of_resampled_brute_force_choices():
    from hfemb.evaluation.metrics import resample_weights

    rng = np.random.default_rng(8)
    scores = np.round(np.sort(rng.random((20, 6)), axis=1)[:, ::-1], 2)  # ties within and across queries
    hit = rng.random((20, 6)) < 0.35
    n_rel = hit.sum(axis=1) + rng.integers(0, 2, size=20)
    chosen = []
    for counts in np.concatenate(list(resample_weights(20, 25, seed=6))):
        take = np.arange(20).repeat(counts.astype(int))  # each query as often as the resample drew it
        chosen.append(rm.topk_best_f1(scores[take], hit[take], n_rel[take])["threshold"])
    assert rm.topk_bagged_threshold(scores, hit, n_rel, n_boot=25, seed=6) == pytest.approx(np.median(chosen))
    assert math.isnan(rm.topk_bagged_threshold(scores, hit, np.zeros(20, int)))

def test_bootstrap_means_identical_models_and_constants():
    rng = np.random.default_rng(4)
    v = rng.random(50)
    ci = rm.bootstrap_means(np.stack([v, v, np.full(50, 0.3)]), n_boot=300, seed=0)
    assert ci["diff"][1] == (0.0, 0.0)
    assert ci["mean"][2] == pytest.approx((0.3, 0.3))
    lo, hi = ci["mean"][0]
    assert lo < v.mean() < hi


# ------------------------------------------------------------------------------------------- data
def _beir(tmp_path, corpus, queries, qrels, split="test"):
    (tmp_path / "qrels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n", encoding="utf-8")
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in queries) + "\n", encoding="utf-8")
    (tmp_path / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels), encoding="utf-8")
    return tmp_path


def test_read_beir_title_join_and_split(tmp_path):
    folder = _beir(tmp_path, [{"_id": "a", "title": "T", "text": "body"}, {"_id": 7, "title": "", "text": "x"},
                              {"_id": "c", "text": "y"}],
                   [{"_id": "q1", "text": "one"}, {"_id": "q2", "text": "two"}], [("q2", "a", 2), ("q2", "c", 0)])
    rset = read_beir(folder)
    assert rset.doc_texts == ["T body", "x", "y"] and rset.doc_ids == ["a", "7", "c"]
    assert rset.query_ids == ["q2"] and rset.qrels == {"q2": {"a": 2, "c": 0}}
    with pytest.raises(DataError, match=r"no qrels/dev.tsv \(splits here: test\)"):
        read_beir(folder, "dev")


@pytest.mark.parametrize("corpus_line, qrels_row, match", [
    ('{"_id": "a", "text": "x"}\n{"title": "t", "text": "y"}', ("q1", "a", 1), r"corpus.jsonl:2, field '_id': missing"),
    ('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}', ("q1", "a", 1), r"corpus.jsonl:2, field '_id': duplicate"),
    ('{"_id": "a", "text": "x"}\n{bad', ("q1", "a", 1), r"corpus.jsonl:2: not valid JSON"),
    ('{"_id": "a", "text": 3}', ("q1", "a", 1), r"corpus.jsonl:1, field 'text': expected a string"),
    ('{"_id": "a", "text": "x"}', ("q1", "a", "high"), r"test.tsv:2, field 'score': expected an integer"),
    ('{"_id": "a", "text": "x"}', ("q9", "a", 1), r"test.tsv, field 'query-id': query-id 'q9' is not in"),
])
def test_read_beir_errors_name_file_line_field(tmp_path, corpus_line, qrels_row, match):
    folder = _beir(tmp_path, [], [{"_id": "q1", "text": "one"}], [qrels_row])
    (folder / "corpus.jsonl").write_text(corpus_line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=match):
        read_beir(folder)


def test_retrieval_set_from_records_with_corpus():
    records = [Record("q one", ["p1"], ["n1"]), Record("q two", [], candidates=[("p2", 2), ("c0", 0)]),
               Record("q one", ["p1b"])]
    rset = retrieval_set_from_records(records, ["c0", "other", "p1"])
    assert rset.doc_texts == ["c0", "other", "p1", "p2", "p1b"]  # judged positives join the corpus; n1 does not
    assert rset.query_texts == ["q one", "q two"]
    assert qrels_by_index(rset) == [{2: 1, 4: 1}, {3: 2, 0: 0}]
    assert rset.stats["judged_documents_added_to_corpus"] == 2


# ---------------------------------------------------------------------------------------- end to end
def test_run_eval_beir_folder_matches_sentence_transformers(tmp_path, minilm):
    """`run_eval.py --data BEIR --model NAME=PATH --output-dir OUT`: results.json's retrieval metrics equal an
    independent computation (sentence-transformers encodes, a full score matrix, sklearn's nDCG)."""
    from sentence_transformers import SentenceTransformer
    from sklearn.metrics import ndcg_score

    from hfemb.cli import main

    corpus = [{"_id": f"d{i}", "title": t, "text": x} for i, (t, x) in enumerate([
        ("Paris", "Paris is the capital of France."), ("", "The cat sat on the mat."),
        ("Berlin", "Berlin is the capital and largest city of Germany."), ("", "Dogs love to play fetch in parks."),
        ("Python", "Python is a programming language."), ("", "Rome is the capital of Italy."),
        ("Tea", "Green tea contains antioxidants."), ("", "The Nile is a long river in Africa.")])]
    queries = [{"_id": "q1", "text": "capital of France"}, {"_id": "q2", "text": "which pet plays fetch"},
               {"_id": "q3", "text": "German capital"}, {"_id": "q4", "text": "longest African river"},
               {"_id": "q5", "text": "a coding language"}]
    qrels = [("q1", "d0", 2), ("q1", "d5", 1), ("q2", "d3", 1), ("q3", "d2", 1), ("q4", "d7", 1), ("q4", "d1", 0)]
    folder = _beir(tmp_path / "beir", corpus, queries, qrels)
    _beir(folder, corpus, queries, [("q5", "d4", 1)], split="dev")
    out = tmp_path / "out"
    assert main(["eval", "--data", str(folder), "--model", f"mini={minilm}", "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet", "--bootstrap", "200"]) == 0
    report = json.loads((out / "results.json").read_text())
    r = report["models"]["mini"]["retrieval"]
    assert report["data"]["dev"]["split"] == "dev" and report["models"]["mini"]["threshold"]["chosen_on"] == "dev"

    st = SentenceTransformer(minilm, device="cpu")
    texts = [f"{d['title']} {d['text']}" if d["title"] else d["text"] for d in corpus]
    d_emb = st.encode(texts, normalize_embeddings=True)
    q_emb = st.encode([q["text"] for q in queries[:4]], normalize_embeddings=True)
    full = q_emb @ d_emb.T
    grades = np.zeros_like(full)
    for q, d, s in qrels:
        grades[int(q[1:]) - 1, int(d[1:])] = s
    assert r["ndcg@10"] == pytest.approx(np.mean([ndcg_score(grades[i:i + 1], full[i:i + 1], k=10)
                                                  for i in range(4)]), abs=1e-5)
    first_hit = [next(rank for rank, d in enumerate(np.argsort(-full[i])) if grades[i, d] >= 1) for i in range(4)]
    assert r["mrr@10"] == pytest.approx(np.mean([1 / (f + 1) for f in first_hit]), abs=1e-6)
    assert r["recall@1"] == pytest.approx(np.mean([(grades[i, np.argmax(full[i])] >= 1) / (grades[i] >= 1).sum()
                                                   for i in range(4)]))
    assert {"recall@5", "recall@10", "recall@100", "map@100"} <= set(r) and r["queries"] == 4
    md = (out / "results.md").read_text()
    assert "nDCG@10" in md and "MRR@10" in md and "R@10" in md and f"{r['ndcg@10']:.4f}" in md


def test_run_eval_records_with_corpus(tmp_path, minilm):
    from hfemb.cli import main

    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"query": "capital of France", "positive": ["Paris is the capital of France."]},
        {"query": "which pet plays fetch", "positive": ["Dogs love to play fetch."]}]) + "\n", encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Rome is in Italy.\nGreen tea is healthy.\nParis is the capital of France.\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["eval", "--data", str(data), "--corpus", str(corpus), "--model", f"mini={minilm}",
                 "--output-dir", str(out), "--no-cache", "--quiet", "--bootstrap", "0"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["data"]["eval"]["documents"] == 4 and report["data"]["eval"]["judged_documents_added_to_corpus"] == 1
    assert report["models"]["mini"]["retrieval"]["recall@1"] == 1.0


def test_knowledge_tsv_as_corpus(tmp_path):
    """A 'name<TAB>text' knowledge base (the TCM layout) gives its texts as documents; plain lines stay whole."""
    from hfemb.commands.eval import read_retrieval_corpus

    kb = tmp_path / "kb.txt"
    kb.write_text("气虚证\t气虚证：神疲乏力，少气懒言。\n血瘀证\t血瘀证：刺痛拒按。\n", encoding="utf-8")
    assert read_retrieval_corpus(kb) == ["气虚证：神疲乏力，少气懒言。", "血瘀证：刺痛拒按。"]
    plain = tmp_path / "plain.txt"
    plain.write_text("one document\nanother\tone with a tab\n", encoding="utf-8")
    assert read_retrieval_corpus(plain) == ["one document", "another\tone with a tab"]
