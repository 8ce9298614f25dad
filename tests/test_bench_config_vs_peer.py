"""bench/bench_config_vs_peer.py's paired differences: the ROC-AUC point estimate equals sklearn's AUCs of the two
models' cosines (computed here with sentence-transformers) and its query-bootstrap interval brackets it; the mean
over seeds reduces to sklearn's F1 / AUC differences and to the evaluation's paired F1 interval for one seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_config_vs_peer  # noqa: E402

POOLS = [("how do plants make food", ["plants make food by photosynthesis", "the stock market fell", "leaves are green",
                                      "plants need light to grow"], [1, 0, 0, 1]),
         ("what is the capital of france", ["paris is the capital of france", "france is in europe",
                                            "berlin is in germany"], [1, 0, 0]),
         ("why is the sky blue", ["air scatters blue light", "sunsets are red", "chess is a game"], [1, 0, 0]),
         ("how do cats sleep", ["cats sleep most of the day", "dogs bark", "cats curl up to sleep"], [1, 0, 1])]


LABELS = [lab for _, _, ls in POOLS for lab in ls]


def write_pools(folder: Path) -> Path:
    pool_file = folder / "pools.jsonl"
    pool_file.write_text("".join(json.dumps({"query": q, "documents": [{"content": d, "label": lab}
                                                                      for d, lab in zip(docs, labels)]}) + "\n"
                                 for q, docs, labels in POOLS))
    return pool_file


def st_scores(path: str) -> np.ndarray:
    """Every (question, candidate) cosine by sentence-transformers, in the pool file's order."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    return np.array([float(model.encode(q, normalize_embeddings=True, prompt_name="query" if "query" in model.prompts
                                        else None) @ model.encode(d, normalize_embeddings=True))
                     for q, docs, _ in POOLS for d in docs])


def test_paired_auc_difference_equals_sklearn(tmp_path, monkeypatch, minilm, tiny_qwen3):
    from sklearn.metrics import roc_auc_score

    monkeypatch.setenv("HFEMB_CACHE", str(tmp_path / "cache"))
    pool_file = write_pools(tmp_path)

    def auc(path):
        return roc_auc_score(LABELS, st_scores(path))

    diff, lo, hi = bench_config_vs_peer.paired_auc_diff(tiny_qwen3, minilm, pool_file, n_bootstrap=200)
    assert diff == pytest.approx(auc(minilm) - auc(tiny_qwen3), abs=1e-4)
    assert lo <= diff <= hi and lo < hi
    assert bench_config_vs_peer.paired_auc_diff(minilm, minilm, pool_file, n_bootstrap=50) == (0.0, 0.0, 0.0)
    assert np.isfinite([lo, hi]).all()


def test_ablations_collect_overrides_by_name():
    specs = ["qd=loss.query_negatives=true", "mined=data.pool_negatives=0", "qd=loss.document_negatives=true"]
    assert bench_config_vs_peer.ablations(specs) == {
        "qd": ["loss.query_negatives=true", "loss.document_negatives=true"], "mined": ["data.pool_negatives=0"]}
    with pytest.raises(SystemExit, match="NAME=KEY=VALUE"):
        bench_config_vs_peer.ablations(["qd-loss.query_negatives"])


def test_seed_mean_vs_peer_reduces_to_sklearn_and_the_evaluations_interval(tmp_path, monkeypatch, minilm, tiny_qwen3):
    from sklearn.metrics import f1_score, roc_auc_score

    from hfemb.evaluation.metrics import bootstrap_f1, query_confusion

    monkeypatch.setenv("HFEMB_CACHE", str(tmp_path / "cache"))
    pool_file = write_pools(tmp_path)
    peer, model = st_scores(tiny_qwen3), st_scores(minilm)
    # thresholds halfway between two of a model's cosines (no pair at the threshold, where float noise would decide)
    t_peer, t_model = (float(np.sort(s)[5:7].mean()) for s in (peer, model))
    one = bench_config_vs_peer.seed_mean_vs_peer([(tiny_qwen3, t_peer, minilm, t_model)], pool_file, n_bootstrap=300)
    assert one["f1_diff"] == pytest.approx(f1_score(LABELS, model >= t_model) - f1_score(LABELS, peer >= t_peer),
                                           abs=1e-9)
    assert one["auc_diff"] == pytest.approx(roc_auc_score(LABELS, model) - roc_auc_score(LABELS, peer), abs=1e-4)
    # every question holds a positive and a negative, so no resample is dropped: the F1 interval is the
    # evaluation's own paired interval (bootstrap_f1, the same resamples)
    groups = np.repeat(np.arange(len(POOLS)), [len(docs) for _, docs, _ in POOLS])
    confusions = [query_confusion(groups, LABELS, s, t) for s, t in ((peer, t_peer), (model, t_model))]
    assert one["f1_diff_ci"] == pytest.approx(list(bootstrap_f1(confusions, n_boot=300, seed=0)["diff"][1]), abs=1e-9)
    # the AUC interval: each resample's questions repeated as drawn (np.repeat), sklearn's AUC on the copies
    from hfemb.evaluation.metrics import resample_weights

    diffs = []
    for counts in np.concatenate(list(resample_weights(len(POOLS), 300, 0))):
        reps = counts[groups].astype(int)
        y = np.repeat(LABELS, reps)
        diffs.append(roc_auc_score(y, np.repeat(model, reps)) - roc_auc_score(y, np.repeat(peer, reps)))
    assert one["auc_diff_ci"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])), abs=2e-4)
    assert one["auc_diff_ci"][0] < one["auc_diff_ci"][1]
    # two seeds whose differences cancel: mean 0 in every resample
    both = bench_config_vs_peer.seed_mean_vs_peer([(tiny_qwen3, t_peer, minilm, t_model),
                                                   (minilm, t_model, tiny_qwen3, t_peer)], pool_file, n_bootstrap=100)
    assert both["f1_diff"] == pytest.approx(0, abs=1e-12) and both["auc_diff"] == pytest.approx(0, abs=1e-12)
    assert both["f1_diff_ci"] == pytest.approx([0, 0], abs=1e-12)
    assert both["auc_diff_ci"] == pytest.approx([0, 0], abs=1e-12)


def test_pairs_file_keeps_every_labelled_positive_and_mines_in_corpus_mode(tmp_path):
    """--pairs-only: one (question, positive) row per label 1, in order, no candidates; `hfemb mine` reads it in
    corpus mode and takes negatives from the other questions' answers only."""
    import common

    pool_file = write_pools(tmp_path)
    pool_file = pool_file.rename(tmp_path / "wikiqa-train.pos.jsonl")
    pairs = common.wikiqa_pairs_file(pool_file)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    expected = [{"query": q, "positive": d} for q, docs, labels in POOLS for d, lab in zip(docs, labels) if lab == 1]
    assert pairs.name == "wikiqa-train.pairs.jsonl" and rows == expected
    written = pairs.stat().st_mtime_ns
    assert common.wikiqa_pairs_file(pool_file) == pairs and pairs.stat().st_mtime_ns == written  # reused, not rewritten

    from hfemb.cli import main as cli

    mined = tmp_path / "mined.jsonl"
    assert cli(["mine", "--input", str(pairs), "--output", str(mined), "--tokenizer", "regex", "--num-negatives", "1",
                "--num-hard", "1"]) == 0
    report = json.loads(Path(f"{mined}.report.json").read_text())
    assert report["mode"] == "corpus"
    answers = {d for _, docs, labels in POOLS for d, lab in zip(docs, labels) if lab == 1}
    for line in mined.read_text().splitlines():
        row = json.loads(line)
        own = {r["positive"] for r in expected if r["query"] == row["query"]}
        assert row["negative"] and set(row["negative"]) <= answers - own
