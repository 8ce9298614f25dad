"""MultiNegCollator on the tiny Qwen3 (left padding, prompt, <|endoftext|>) and MiniLM (right padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfemb.training.collator import MultiNegCollator, length_of
from hfemb.errors import DataError
from hfemb.training.loss import info_nce_loss
from hfemb.modeling.loading import load_embedding_model

ENDOFTEXT_ID = 151643
ROWS = [
    {"query": "高血压吃什么药", "positive": "常用降压药有氨氯地平、缬沙坦等。", "negatives": ["感冒多喝水。", "共同的文本"]},
    {"query": "what helps a sore throat", "positive": "共同的文本",
     "negatives": ["Warm salt water gargles and honey help a sore throat heal faster.", "感冒多喝水。"]},
]


@pytest.fixture(scope="module")
def tiny(tiny_qwen3):
    return load_embedding_model(tiny_qwen3)


def test_batch_layout_and_doc_text_ids(tiny):
    batch = MultiNegCollator(tiny, query_max_len=64, passage_max_len=512, num_negatives=2)(ROWS)
    assert set(batch) == {"query_input_ids", "query_attention_mask", "doc_input_ids", "doc_attention_mask",
                          "doc_text_ids", "query_text_ids", "query_positive_ids"}  # never "labels"
    docs = [t for r in ROWS for t in (r["positive"], *r["negatives"])]
    assert batch["query_input_ids"].shape[0] == 2 and batch["doc_input_ids"].shape[0] == 6
    assert all(v.dtype == torch.int64 for v in batch.values())
    # doc_text_ids: equal <=> identical text
    ids = batch["doc_text_ids"].tolist()
    for i in range(6):
        for j in range(6):
            assert (ids[i] == ids[j]) == (docs[i] == docs[j])
    # documents in order [pos_0, neg_0_1, neg_0_2, pos_1, ...]: each row decodes to its text + <|endoftext|>
    for row, text in zip(range(6), docs):
        real = batch["doc_input_ids"][row][batch["doc_attention_mask"][row].bool()]
        assert tiny.tokenizer.decode(real) == text + "<|endoftext|>"
    # queries carry the model's prompt; left padding: every row ends in its real <|endoftext|>
    first = batch["query_input_ids"][0][batch["query_attention_mask"][0].bool()]
    assert tiny.tokenizer.decode(first) == tiny.query_prompt + ROWS[0]["query"] + "<|endoftext|>"
    assert (batch["query_input_ids"][:, -1] == ENDOFTEXT_ID).all() and (batch["doc_attention_mask"][:, -1] == 1).all()
    # dynamic padding: as wide as the longest text, not the maximum length
    assert batch["doc_input_ids"].shape[1] == int(batch["doc_attention_mask"].sum(dim=1).max()) < 512


def test_batch_embeddings_equal_encode(tiny):
    batch = MultiNegCollator(tiny, num_negatives=2)(ROWS)
    with torch.no_grad():
        q = tiny(batch["query_input_ids"], batch["query_attention_mask"])
        d = tiny(batch["doc_input_ids"], batch["doc_attention_mask"])
    docs = [t for r in ROWS for t in (r["positive"], *r["negatives"])]
    np.testing.assert_allclose(q.numpy(), tiny.encode([r["query"] for r in ROWS], is_query=True), atol=1e-5)
    np.testing.assert_allclose(d.numpy(), tiny.encode(docs, is_query=False), atol=1e-5)
    out = info_nce_loss(q, d, group_size=3, mask_false_negatives=True, doc_text_ids=batch["doc_text_ids"])
    # "共同的文本" is row 0's second negative and row 1's positive: masked for query 1 at column 2
    assert out.mask[1, 2] and out.mask[0, 2] == (d[2] @ q[0] > d[0] @ q[0] + 0.1)


def test_truncation_keeps_the_end_token(tiny):
    rows = [{"query": "很长的问题" * 50, "positive": "很长的回答" * 200, "negatives": ["短"]}]
    batch = MultiNegCollator(tiny, query_max_len=16, passage_max_len=32, num_negatives=1)(rows)
    assert batch["query_input_ids"].shape == (1, 16) and batch["doc_input_ids"].shape == (2, 32)
    assert (batch["query_input_ids"][:, -1] == ENDOFTEXT_ID).all() and (batch["doc_input_ids"][:, -1] == ENDOFTEXT_ID).all()


def test_minilm_pads_on_the_right(minilm):
    model = load_embedding_model(minilm)
    batch = MultiNegCollator(model, num_negatives=1)([
        {"query": "q", "positive": "a short answer", "negatives": ["a much longer negative passage about colds"]}])
    mask = batch["doc_attention_mask"]
    assert mask[0, 0] == 1 and mask[0, -1] == 0 and mask[1].all()
    assert model.tokenizer.decode(batch["doc_input_ids"][0][mask[0].bool()]) == "[CLS] a short answer [SEP]"


def test_bad_rows_name_the_row_and_field(tiny):
    collate = MultiNegCollator(tiny, num_negatives=2)
    with pytest.raises(DataError, match="training row 1 of the batch: has 1 negatives, expected num_negatives=2") as err:
        collate([ROWS[0], {**ROWS[1], "negatives": ["only one"]}])
    assert err.value.field == "negatives"
    with pytest.raises(DataError, match="data.jsonl:7.*expected a string") as err:
        collate([{**ROWS[0], "positive": None, "source": "data.jsonl:7"}])
    assert err.value.field == "positive"
    with pytest.raises(DataError, match="list of strings"):
        collate([{**ROWS[0], "negatives": "not a list"}])


def test_length_of():
    assert length_of(ROWS[1]) == len("Warm salt water gargles and honey help a sore throat heal faster.")
    assert length_of({"query": "q", "positive": "abc", "negatives": []}) == 3
