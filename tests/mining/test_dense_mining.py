"""`hfemb mine --scorer dense|hybrid --model --teacher`: checked against sentence-transformers cosines,
scipy ranks and brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import rankdata

from hfemb.cli import main
from hfemb.mining.bm25 import BM25, tokenize
from hfemb.mining.dense import positive_limit, ranks_best_first, rrf_scores

TOPICS = {
    "how do plants make food": ["plants make food by photosynthesis using sunlight",
                                "photosynthesis in leaves turns light into sugar",
                                "the stock market fell on monday", "cats sleep most of the day",
                                "leaves are green because of chlorophyll", "football is played with a ball",
                                "bread is baked in an oven"],
    "what is the capital of france": ["paris is the capital of france", "france is a country in europe",
                                      "lyon is a large city in france", "the moon orbits the earth",
                                      "berlin is the capital of germany", "water boils at 100 degrees",
                                      "a guitar has six strings"],
    "why is the sky blue": ["the sky is blue because air scatters blue light", "sunsets are red and orange",
                            "the ocean looks blue too", "elephants are large mammals",
                            "light is made of many colours", "chess is a board game", "rice grows in water"],
}


def _pools(tmp_path):
    path = tmp_path / "pools.jsonl"
    with open(path, "w") as fh:
        for q, docs in TOPICS.items():
            fh.write(json.dumps({"query": q, "documents": [{"content": d, "label": int(i == 0)}
                                                           for i, d in enumerate(docs)]}) + "\n")
    return path


@pytest.fixture(autouse=True)
def _embedding_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HFEMB_CACHE", str(tmp_path / "hfemb-cache"))  # no vectors in the user's cache


@pytest.fixture(scope="module")
def st_model(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm, device="cpu")


def _cos(st_model, a: str, b: str) -> float:
    va, vb = st_model.encode([a, b], normalize_embeddings=True)
    return float(va @ vb)


def _mine(capsys, tmp_path, *extra):
    out = tmp_path / "out.jsonl"
    code = main(["mine", "--input", str(_pools(tmp_path)), "--output", str(out), "--mode", "pool", "--tokenizer",
                 "regex", "--cache-dir", str(tmp_path / "tok"), *map(str, extra)])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in open(out)]
    return rows, json.loads(open(f"{out}.report.json").read())


def test_ranks_and_rrf_match_scipy():
    scores = np.array([0.3, 0.9, 0.3, -1.0, 0.9, 0.5])
    assert ranks_best_first(scores).tolist() == rankdata(-scores, method="min").astype(int).tolist()
    a, b = np.array([3.0, 1.0, 2.0]), np.array([0.1, 0.9, 0.5])
    expected = 1 / (60 + rankdata(-a, method="min")) + 1 / (60 + rankdata(-b, method="min"))
    assert np.allclose(rrf_scores(a, b), expected)
    assert positive_limit(0.8, 0.95, None) == pytest.approx(0.76)
    assert positive_limit(0.8, 0.95, 0.1) == pytest.approx(0.70)
    assert positive_limit(-0.2, 0.95, None) is None  # no relative limit on a negative positive score


def test_dense_pool_mode_takes_the_models_top_candidate(capsys, tmp_path, minilm, st_model):
    rows, report = _mine(capsys, tmp_path, "--scorer", "dense", "--model", minilm, "--num-negatives", 2,
                         "--num-hard", 1, "--hard-top-k", 1, "--easy-bottom-k", 1)
    assert report["scorer"] == "dense" and len(rows) == 3
    for row in rows:
        docs = TOPICS[row["query"]]
        cos = {d: _cos(st_model, row["query"], d) for d in docs[1:]}
        best, worst = max(cos, key=cos.get), min(cos, key=cos.get)
        assert row["negative"] == [best, worst] and row["mining"]["kinds"] == ["hard", "easy"]
        assert row["mining"]["dense"] == pytest.approx([cos[best], cos[worst]], abs=1e-5)
        assert row["mining"]["positive_dense"] == pytest.approx(_cos(st_model, row["query"], docs[0]), abs=1e-5)
        assert len(row["mining"]["bm25"]) == 2 and "positive_bm25" in row["mining"]
        assert row["mining"]["mode"] == "pool"  # training picks its temperature by it (resolved_temperature)


def test_hybrid_ranks_by_reciprocal_rank_fusion(capsys, tmp_path, minilm, st_model):
    rows, _ = _mine(capsys, tmp_path, "--scorer", "hybrid", "--model", minilm, "--num-negatives", 1,
                    "--num-hard", 1, "--hard-top-k", 1)
    all_docs = [d for docs in TOPICS.values() for d in docs]
    index = BM25(tokenize(all_docs, "regex", use_cache=False))  # pool mode: idf over all pools
    for row in rows:
        docs = TOPICS[row["query"]]
        bm = index.score_batch(tokenize([row["query"]], "regex", use_cache=False))[0]
        bm_scores = np.array([bm[all_docs.index(d)] for d in docs[1:]])
        dense = np.array([_cos(st_model, row["query"], d) for d in docs[1:]])
        fused = 1 / (60 + rankdata(-bm_scores, method="min")) + 1 / (60 + rankdata(-dense, method="min"))
        top = np.flatnonzero(fused == fused.max())
        assert row["negative"][0] in {docs[1 + i] for i in top}
        assert row["mining"]["rrf"][0] == pytest.approx(fused.max(), abs=1e-6)


def test_positive_aware_filter_and_teacher_scores(capsys, tmp_path, minilm, st_model):
    rows, report = _mine(capsys, tmp_path, "--scorer", "dense", "--model", minilm, "--max-relative-score", 0.6,
                         "--num-negatives", 2, "--teacher", minilm)
    expected_filtered = 0
    for q, docs in TOPICS.items():
        pos = _cos(st_model, q, docs[0])
        expected_filtered += sum(_cos(st_model, q, d) > 0.6 * pos for d in docs[1:])
    assert expected_filtered > 0 and report["score_filtered_candidates"] == expected_filtered
    for row in rows:
        assert max(row["mining"]["dense"]) <= 0.6 * row["mining"]["positive_dense"] + 1e-6
        assert row["pos_scores"] == pytest.approx([_cos(st_model, row["query"], row["positive"])], abs=1e-5)
        assert row["neg_scores"] == pytest.approx([_cos(st_model, row["query"], n) for n in row["negative"]], abs=1e-5)
        pools = row["negative_candidates"]  # the pools training redraws from carry the teacher's scores too
        assert set(pools) == set(row["negative_candidate_scores"]) and pools
        for kind, texts in pools.items():
            assert row["negative_candidate_scores"][kind] == pytest.approx(
                [_cos(st_model, row["query"], t) for t in texts], abs=1e-5)
    assert report["teacher"]["texts"] > 0


def test_corpus_mode_dense_brute_force(capsys, tmp_path, minilm, st_model):
    path = tmp_path / "qa.jsonl"
    with open(path, "w") as fh:
        for q, docs in TOPICS.items():
            fh.write(json.dumps({"query": q, "positive": docs[0]}) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(d for docs in TOPICS.values() for d in docs) + "\n")
    out = tmp_path / "c.jsonl"
    code = main(["mine", "--input", str(path), "--output", str(out), "--mode", "corpus", "--corpus", str(corpus),
                 "--tokenizer", "regex", "--scorer", "dense", "--model", minilm, "--num-negatives", "1",
                 "--hard-top-k", "1", "--cache-dir", str(tmp_path / "tok")])
    assert code == 0, capsys.readouterr().err
    all_docs = [d for docs in TOPICS.values() for d in docs]
    for row in map(json.loads, open(out)):
        cos = {d: _cos(st_model, row["query"], d) for d in all_docs if d != row["positive"]}
        assert row["negative"] == [max(cos, key=cos.get)] and row["mining"]["mode"] == "corpus"


def test_scorer_errors_are_one_line(capsys, tmp_path, minilm):
    for extra, message in (([ "--scorer", "dense"], "needs a model"),
                           (["--model", minilm], "--model is used by --scorer dense or hybrid"),
                           (["--max-score-margin", "0.1"], "max_score_margin applies to a model")):
        code = main(["mine", "--input", str(_pools(tmp_path)), "--output", str(tmp_path / "o.jsonl"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.jsonl").exists()
