"""The evaluation's encode step (`hfemb.evaluation.encoders.encode_texts`) gives exactly ``model.encode``'s
vectors (one call per prompt: same tokenisation, batches and dtype), writes the cache as it goes (an interrupted
run resumes), and ``EmbeddingModel.encode(on_batch=...)`` reports every row once with the returned vectors."""

from __future__ import annotations

import numpy as np
import pytest

import hfemb.evaluation.encoders as eval_models
from hfemb.evaluation.encoders import encode_texts
from hfemb.evaluation.settings import EvalSettings
from hfemb.modeling.loading import load_embedding_model
from hfemb.modeling.model import EmbeddingModel

WORDS = ["rain", "snow", "cat", "dog", "tea", "river", "stone", "lamp", "bread", "wind", "高血压", "头痛。"]


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return list(dict.fromkeys(" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))) for _ in range(n)))


def test_on_batch_reports_each_row_once(tiny_qwen3):
    model = load_embedding_model(tiny_qwen3)
    texts = _texts(70, 0)
    seen = {}
    out = model.encode(texts, is_query=False, batch_size=8, on_batch=lambda idx, v: seen.update(zip(idx, v)))
    assert sorted(seen) == list(range(len(texts)))
    np.testing.assert_array_equal(np.stack([seen[i].numpy() for i in range(len(texts))]), out)
    np.testing.assert_array_equal(out, model.encode(texts, is_query=False, batch_size=8))  # unchanged by it


@pytest.mark.parametrize("padding_free", [True, False])
def test_encode_texts_equals_model_encode_bit_for_bit(tiny_qwen3, tmp_path, padding_free, monkeypatch):
    monkeypatch.setattr(eval_models, "CACHE_FLUSH_TEXTS", 16)  # several cache writes
    queries, docs = _texts(30, 1), _texts(90, 2)
    settings = EvalSettings(cache_dir=str(tmp_path), show_progress=False, batch_size=8, max_tokens_per_batch=200,
                            padding_free=padding_free)
    enc = encode_texts(tiny_qwen3, "t", queries, docs, settings)
    model = load_embedding_model(tiny_qwen3, padding_free=padding_free)
    kw = {"batch_size": 8, "max_tokens_per_batch": 200, "max_length": 512}
    np.testing.assert_array_equal(enc.queries, model.encode(queries, is_query=True, **kw))
    np.testing.assert_array_equal(enc.documents, model.encode(docs, is_query=False, **kw))
    again = encode_texts(tiny_qwen3, "t", queries, docs, settings)  # all from the cache, the same bits
    assert again.info["texts_encoded"] == 0
    np.testing.assert_array_equal(again.documents, enc.documents)


def test_interrupted_local_encode_resumes_from_flushed_batches(tiny_qwen3, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_models, "CACHE_FLUSH_TEXTS", 10)
    docs = _texts(60, 3)
    settings = EvalSettings(cache_dir=str(tmp_path), show_progress=False, batch_size=4)
    real_forward, calls = EmbeddingModel.forward, []

    def failing(self, *a, **k):  # the 6th batch fails: 20 texts done, 12 of them flushed (at >= 10)
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_forward(self, *a, **k)

    monkeypatch.setattr(EmbeddingModel, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        encode_texts(tiny_qwen3, "t", [], docs, settings)
    monkeypatch.setattr(EmbeddingModel, "forward", real_forward)
    resumed = encode_texts(tiny_qwen3, "t", [], docs, settings)
    assert resumed.info["texts_encoded"] == len(docs) - 12
    fresh = load_embedding_model(tiny_qwen3).encode(docs, is_query=False, batch_size=4, max_tokens_per_batch=16384)
    np.testing.assert_allclose(resumed.documents, fresh, atol=1e-6)  # other batches for the rest: rounding only
