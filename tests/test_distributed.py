"""Cross-device negatives: the loss with gathered documents (``doc_offset``) by hand, and real 2-process
gloo runs of the Trainer (DDP on CPU) against one process on the concatenated batch: same loss, same
parameter gradients, false negatives masked across processes, GradCache under DDP."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hfemb.loss import MASKED_LOGIT, info_nce_loss


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- the loss with gathered documents ------------------------------------------------------------
def test_doc_offset_rows_equal_the_single_process_loss():
    """2 'processes' x (B=2 queries, G=3 documents each): each process's logits are its rows of the
    single-process logits on the concatenated batch, labels offset by rank*B*G, and the mean of the two
    losses is the single-process loss."""
    b, g, w = 2, 3, 2
    q, d = _unit(w * b, 8, seed=1), _unit(w * b * g, 8, seed=2)
    full = info_nce_loss(q, d, group_size=g, temperature=0.05)
    parts = []
    for r in range(w):
        out = info_nce_loss(q[r * b:(r + 1) * b], d, group_size=g, temperature=0.05, doc_offset=r * b * g)
        assert out.labels.tolist() == [r * b * g, r * b * g + g]
        torch.testing.assert_close(out.logits, full.logits[r * b:(r + 1) * b])
        parts.append(out.loss)
    torch.testing.assert_close(torch.stack(parts).mean(), full.loss)
    # by hand for query 3 (process 1, second query): positive = document 3*G = 9
    logits = q[3] @ d.T / 0.05
    torch.testing.assert_close(parts[1] * 2 - F.cross_entropy(logits[None], torch.tensor([9])),
                               F.cross_entropy((q[2] @ d.T / 0.05)[None], torch.tensor([6])))


def test_doc_offset_masks_a_duplicate_of_the_positive_held_by_another_process():
    b, g = 1, 2
    q, d = _unit(2, 4, seed=3), _unit(4, 4, seed=4)
    ids = torch.tensor([10, 11, 20, 10])  # process 1's negative (row 3) has the text of process 0's positive
    out = info_nce_loss(q[:1], d, group_size=g, mask_false_negatives=True, false_negative_margin=10.0,
                        doc_text_ids=ids, doc_offset=0)
    assert out.mask.tolist() == [[False, False, False, True]] and out.logits[0, 3] == MASKED_LOGIT
    other = info_nce_loss(q[1:], d, group_size=g, mask_false_negatives=True, false_negative_margin=10.0,
                          doc_text_ids=ids, doc_offset=2)
    assert other.mask.tolist() == [[False, False, False, False]] and other.labels.tolist() == [2]
    expected = F.cross_entropy((q[0] @ d[:3].T / 0.05)[None], torch.tensor([0]))
    torch.testing.assert_close(out.loss, expected)


def test_doc_offset_is_checked():
    q, d = _unit(2, 4), _unit(4, 4)
    with pytest.raises(ValueError, match="rows 2..5"):
        info_nce_loss(q, d, group_size=2, doc_offset=2)
    with pytest.raises(ValueError, match="in_batch_negatives"):
        info_nce_loss(q, d, group_size=2, doc_offset=0, in_batch_negatives=False)


def test_gather_rows_single_process_is_the_identity():
    from hfemb.distributed import gather_rows, is_distributed, rank, world_size

    t = torch.randn(3, 2, requires_grad=True)
    out, offset = gather_rows(t)
    assert out is t and offset == 0 and not is_distributed() and world_size() == 1 and rank() == 0


def test_doc_text_ids_identify_texts_across_batches(tiny_qwen3):
    """The collator's ids are a hash of the text (not a per-batch counter): a text has the same id in any
    batch or process, so a duplicate held by another process is recognised."""
    import hashlib

    from hfemb.collator import MultiNegCollator, text_id
    from hfemb.modeling import load_embedding_model

    collate = MultiNegCollator(load_embedding_model(tiny_qwen3), num_negatives=1)
    a = collate([{"query": "q1", "positive": "高血压", "negatives": ["糖尿病"]}])["doc_text_ids"]
    b = collate([{"query": "q2", "positive": "头痛", "negatives": ["x"]},
                 {"query": "q3", "positive": "糖尿病", "negatives": ["高血压"]}])["doc_text_ids"]
    assert a.tolist() == [b[3].item(), b[2].item()] and len(set(b.tolist())) == 4
    expected = int.from_bytes(hashlib.blake2b("高血压".encode(), digest_size=8).digest(), "little") & (2**63 - 1)
    assert text_id("高血压") == expected == a[0].item() >= 0
