"""Several positives of one query (issue 13, item 2): the no-duplicate-query sampler keeps sibling rows out of
one step's batch (checked by brute force over its blocks), and the loss masks a query's known positives --
sibling rows' positives by query id (also when gathered from another process) and any document whose text is
a known positive -- so neither positive is in the other's denominator (hand-computed cross-entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hfemb.training.loss import MASKED_LOGIT, info_nce_loss
from hfemb.training.sampling import NoDuplicateQuerySampler, no_duplicate_blocks


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_sampler_blocks_have_distinct_queries(block):
    queries = [f"q{i % 7}" for i in range(40)] + ["many"] * 12  # 7 queries with 5-6 rows, one with 12
    sampler = NoDuplicateQuerySampler(queries, block_size=block, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(queries)))  # every row once
    blocks, rest = no_duplicate_blocks(queries, order, block)  # re-blocking the output changes nothing
    assert [i for b in blocks for i in b] + rest == order
    full = [order[i:i + block] for i in range(0, len(blocks) * block, block)]
    assert all(len({queries[i] for i in b}) == block for b in full)
    # brute force: no full block is possible among the leftovers (fewer distinct queries than the block)
    assert len({queries[i] for i in rest}) < block or len(rest) < block
    assert len(rest) <= 12  # only rows of the one over-represented query can be left over
    assert list(sampler) != order and list(NoDuplicateQuerySampler(queries, block, seed=3)) == order  # epochs differ; seeded
    sampler.set_epoch(0)
    assert list(sampler) == order


def test_sibling_positives_are_not_each_others_negatives():
    """Rows 0 and 1 are two positives of one query (G = 2: positive, one hard negative). Without query ids
    each sibling positive is a negative of the other; with them, query 0's candidates are its positive, its
    negative, and row 2's documents -- by hand."""
    q, d = _unit(3, 8, seed=1), _unit(6, 8, seed=2)
    q[1] = q[0]  # the same query text
    ids = torch.tensor([7, 7, 9])
    before = info_nce_loss(q, d, group_size=2, mask_duplicates=True)
    assert before.num_masked == 0
    out = info_nce_loss(q, d, group_size=2, query_text_ids=ids)
    assert out.mask.tolist() == [[False, False, True, False, False, False],
                                 [True, False, False, False, False, False],
                                 [False] * 6]
    logits = q @ d.T / 0.1
    by_hand = torch.stack([F.cross_entropy(logits[0, [0, 1, 3, 4, 5]][None], torch.tensor([0])),
                           F.cross_entropy(logits[1, [1, 2, 3, 4, 5]][None], torch.tensor([1])),
                           F.cross_entropy(logits[2][None], torch.tensor([4]))]).mean()
    torch.testing.assert_close(out.loss, by_hand)
    assert out.logits[0, 2] == MASKED_LOGIT and out.logits[1, 0] == MASKED_LOGIT
    # also in the document-document block of the improved contrastive loss
    improved = info_nce_loss(q, d, group_size=2, query_text_ids=ids, document_negatives=True)
    p = d[[0, 2, 4]]
    dd = p @ d.T / 0.1
    dd_mask = torch.zeros(3, 6, dtype=torch.bool)
    dd_mask[0, [0, 2]] = dd_mask[1, [0, 2]] = dd_mask[2, 4] = True
    full = torch.cat([logits.masked_fill(out.mask, MASKED_LOGIT), dd.masked_fill(dd_mask, MASKED_LOGIT)], dim=1)
    torch.testing.assert_close(improved.loss, F.cross_entropy(full, torch.tensor([0, 2, 4])))


def test_known_positive_texts_are_masked_wherever_they_appear():
    """Query 0's second positive (text id 50) is row 1's hard negative: masked for query 0 only, also without
    in-batch negatives (its own group)."""
    q, d = _unit(2, 8, seed=3), _unit(4, 8, seed=4)
    doc_ids = torch.tensor([10, 11, 20, 50])
    known = torch.tensor([[10, 50], [20, -1]])
    out = info_nce_loss(q, d, group_size=2, doc_text_ids=doc_ids, query_positive_ids=known)
    assert out.mask.tolist() == [[False, False, False, True], [False, False, False, False]]
    d2 = d.clone()
    d2[1] = d[3]
    own = info_nce_loss(q, d2, group_size=2, in_batch_negatives=False, doc_text_ids=torch.tensor([10, 50, 20, 21]),
                        query_positive_ids=known)
    assert own.mask.tolist() == [[False, True], [False, False]]
    torch.testing.assert_close(own.loss, F.cross_entropy(torch.tensor([[float(q[0] @ d[0]) / 0.1, MASKED_LOGIT],
                                                                       [float(q[1] @ d[2]) / 0.1,
                                                                        float(q[1] @ d[3]) / 0.1]]),
                                                         torch.tensor([0, 0])))


def test_sibling_on_another_process_is_masked_by_gathered_query_ids():
    """Process 1's view (doc_offset): its query has id 7 like process 0's query, whose positive is column 0."""
    q_all, d = _unit(2, 8, seed=5), _unit(4, 8, seed=6)
    out = info_nce_loss(q_all[1:], d, group_size=2, doc_offset=2, query_text_ids=torch.tensor([7, 7]), query_offset=1)
    assert out.mask.tolist() == [[True, False, False, False]] and out.labels.tolist() == [2]
    with pytest.raises(ValueError, match="query_text_ids has 1 queries for 4"):
        info_nce_loss(q_all[1:], d, group_size=2, doc_offset=2, query_text_ids=torch.tensor([7]))


def test_rows_and_collator_carry_every_positive_of_the_query(tiny_qwen3):
    from hfemb.data.formats import Record
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.collator import MultiNegCollator, text_id
    from hfemb.training.data_rows import rows_from_records

    rows, _ = rows_from_records([Record(query="q", positives=["a", "b"], negatives=["n"]),
                                 Record(query="r", positives=["c"], negatives=["b"])], 1, 0)
    assert [r["query_positives"] for r in rows] == [["a", "b"], ["a", "b"], ["c"]]
    batch = MultiNegCollator(load_embedding_model(tiny_qwen3), num_negatives=1)([rows[0], rows[2]])
    assert batch["query_positive_ids"].tolist() == [[text_id("a"), text_id("b")], [text_id("c"), -1]]
