"""``data.eval_search``: the in-training retrieval evaluator with FAISS gives the metrics of the exact search on the
same model; faiss missing is one clear error before training; the key is type-checked."""

from __future__ import annotations

import json
import sys

import pytest

from hfemb.errors import ConfigError
from hfemb.training.config import config_from_dict


def _cfg(model, tmp_path, **data):
    rows = [{"query": f"question {i} about {w}", "positive": f"{w} is the answer number {i}"}
            for i, w in enumerate(["rain", "snow", "tea", "stone", "river", "lamp", "bread", "wind", "cat", "dog"])]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**r, "negative": ["x"]}) + "\n" for r in rows))
    return config_from_dict({"model": {"name_or_path": model, "finetune_type": "lora"},
                             "data": {"train_file": str(tmp_path / "train.jsonl"),
                                      "eval_file": str(tmp_path / "eval.jsonl"), **data},
                             "training": {"output_dir": str(tmp_path / "out")}})


def test_faiss_eval_search_equals_exact(tiny_qwen3, tmp_path):
    pytest.importorskip("faiss")
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.evaluator import build_evaluators

    model = load_embedding_model(tiny_qwen3)
    (exact,) = build_evaluators(_cfg(tiny_qwen3, tmp_path), [])
    (flat,) = build_evaluators(_cfg(tiny_qwen3, tmp_path, eval_search="faiss"), [])
    assert (exact.kind, exact.search, flat.search) == ("retrieval", "exact", "faiss")
    want, got = exact(model), flat(model)
    assert got.keys() == want.keys() and "ndcg@10" in got
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_eval_search_errors(tiny_qwen3, tmp_path, monkeypatch):
    from hfemb.training.evaluator import build_evaluators

    with pytest.raises(ConfigError, match="eval_search"):
        _cfg(tiny_qwen3, tmp_path, eval_search="ivf")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(ConfigError, match="needs the faiss package"):
        build_evaluators(_cfg(tiny_qwen3, tmp_path, eval_search="faiss"), [])
