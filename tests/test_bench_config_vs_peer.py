"""bench/bench_config_vs_peer.py's paired ROC-AUC difference: the point estimate equals sklearn's AUCs of the two
models' cosines (computed here with sentence-transformers), and the query-bootstrap interval brackets it."""

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


def test_paired_auc_difference_equals_sklearn(tmp_path, monkeypatch, minilm, tiny_qwen3):
    from sentence_transformers import SentenceTransformer
    from sklearn.metrics import roc_auc_score

    monkeypatch.setenv("HFEMB_CACHE", str(tmp_path / "cache"))
    pool_file = tmp_path / "pools.jsonl"
    pool_file.write_text("".join(json.dumps({"query": q, "documents": [{"content": d, "label": lab}
                                                                      for d, lab in zip(docs, labels)]}) + "\n"
                                 for q, docs, labels in POOLS))
    labels = [lab for _, _, ls in POOLS for lab in ls]

    def auc(path):
        model = SentenceTransformer(path, device="cpu")
        scores = [float(model.encode(q, normalize_embeddings=True, prompt_name="query" if "query" in model.prompts
                                     else None) @ model.encode(d, normalize_embeddings=True))
                  for q, docs, _ in POOLS for d in docs]
        return roc_auc_score(labels, scores)

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
