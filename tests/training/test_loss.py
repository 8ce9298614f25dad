"""info_nce_loss against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from hfemb.training.loss import MASKED_LOGIT, info_nce_loss

# Two queries, G = 2 documents each (positive, hard negative), unit vectors in 2-D.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
D = torch.tensor([
    [1.0, 0.0],    # pos_0      cos(q0)=1     cos(q1)=0
    [0.6, 0.8],    # neg_0      cos(q0)=0.6   cos(q1)=0.8
    [0.0, 1.0],    # pos_1      cos(q0)=0     cos(q1)=1
    [0.28, 0.96],  # neg_1      cos(q0)=0.28  cos(q1)=0.96
])


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_in_batch_loss_by_hand():
    out = info_nce_loss(Q, D, group_size=2, temperature=0.5)
    # logits = cos / 0.5; q0: [2, 1.2, 0, 0.56] label 0; q1: [0, 1.6, 2, 1.92] label 2
    loss0 = lse(2.0, 1.2, 0.0, 0.56) - 2.0
    loss1 = lse(0.0, 1.6, 2.0, 1.92) - 2.0
    assert out.loss.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-6)
    assert out.labels.tolist() == [0, 2] and out.logits.shape == (2, 4) and out.mask is None
    torch.testing.assert_close(out.logits, torch.tensor([[2.0, 1.2, 0.0, 0.56], [0.0, 1.6, 2.0, 1.92]]))


def test_own_group_only_loss_by_hand():
    out = info_nce_loss(Q, D, group_size=2, temperature=0.5, in_batch_negatives=False)
    # q0: [2, 1.2] label 0; q1: [2, 1.92] label 0
    expected = ((lse(2.0, 1.2) - 2.0) + (lse(2.0, 1.92) - 2.0)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.labels.tolist() == [0, 0] and out.logits.shape == (2, 2)


def test_false_negative_masking_marks_exactly_the_intended_logits():
    # doc_text_ids: neg_1 (row 3) has the same text as pos_0 (row 0)
    ids = torch.tensor([7, 8, 9, 7])
    out = info_nce_loss(Q, D, group_size=2, temperature=0.5, mask_false_negatives=True,
                        false_negative_margin=0.1, doc_text_ids=ids)
    # q0: same text as its positive -> row 3; margin: cos > 1 + 0.1 -> none.
    # q1: same text as its positive (id 9) -> none besides itself; margin: cos > 1.1 -> none.
    assert out.mask.tolist() == [[False, False, False, True], [False, False, False, False]]
    assert out.logits[0, 3].item() == MASKED_LOGIT and out.num_masked == 1
    expected = ((lse(2.0, 1.2, 0.0) - 2.0) + (lse(0.0, 1.6, 2.0, 1.92) - 2.0)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    # the margin rule: with margin -0.1, q1's neg_1 (0.96 > 1 - 0.1) is masked, and q0's nothing
    # (0.6 < 0.9); a candidate is never masked for being the positive itself
    out = info_nce_loss(Q, D, group_size=2, temperature=0.5, mask_false_negatives=True, false_negative_margin=-0.1)
    assert out.mask.tolist() == [[False, False, False, False], [False, False, False, True]]
    expected = ((lse(2.0, 1.2, 0.0, 0.56) - 2.0) + (lse(0.0, 1.6, 2.0) - 2.0)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    # own-group only: the same rules on [B, G]
    out = info_nce_loss(Q, D, group_size=2, temperature=0.5, in_batch_negatives=False, mask_false_negatives=True,
                        false_negative_margin=-0.1, doc_text_ids=torch.tensor([7, 7, 9, 8]))
    assert out.mask.tolist() == [[False, True], [False, True]]
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)  # only the positive left for each query


def test_masking_keeps_the_loss_finite_and_blocks_gradients():
    q, d = Q.clone().requires_grad_(True), D.clone().requires_grad_(True)
    out = info_nce_loss(q, d, group_size=2, temperature=0.01, mask_false_negatives=True,
                        doc_text_ids=torch.tensor([1, 1, 2, 2]))  # each query's negative duplicates its positive
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all() and q.grad.abs().sum() > 0
    # one query whose only negative is masked: nothing left to contrast -> loss 0, no gradient on the negative
    d1 = D[:2].clone().requires_grad_(True)
    out = info_nce_loss(Q[:1], d1, group_size=2, temperature=0.01, mask_false_negatives=True,
                        doc_text_ids=torch.tensor([1, 1]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6) and d1.grad.abs().max().item() == 0.0


def test_gradient_flows_and_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8), dim=1).requires_grad_(True)
    d = torch.nn.functional.normalize(torch.randn(9, 8), dim=1).requires_grad_(True)
    out = info_nce_loss(q, d, group_size=3, temperature=0.05)
    out.loss.backward()
    q2, d2 = q.detach().clone().requires_grad_(True), d.detach().clone().requires_grad_(True)
    logits = q2 @ d2.T / 0.05
    expected = (logits.logsumexp(dim=1) - logits[torch.arange(3), torch.arange(3) * 3]).mean()
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(d.grad, d2.grad)


def test_bf16_inputs_use_fp32_math():
    torch.manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(4, 16), dim=1).bfloat16()
    d = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).bfloat16()
    out = info_nce_loss(q, d, group_size=2, temperature=0.02, mask_false_negatives=True)
    ref = info_nce_loss(q.float(), d.float(), group_size=2, temperature=0.02, mask_false_negatives=True)
    assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    half = info_nce_loss(q.half(), d.half(), group_size=2, temperature=0.02, mask_false_negatives=True)
    assert torch.isfinite(half.loss)


def test_bad_shapes():
    with pytest.raises(ValueError, match="B\\*group_size"):
        info_nce_loss(Q, D, group_size=3)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(Q, D, group_size=2, temperature=0)


def test_duplicate_texts_are_masked_by_default_without_the_margin_rule():
    ids = torch.tensor([7, 8, 9, 7])  # neg_1 is pos_0's text
    out = info_nce_loss(Q, D, group_size=2, temperature=0.5, doc_text_ids=ids)
    assert out.mask.tolist() == [[False, False, False, True], [False, False, False, False]]
    expected = ((lse(2.0, 1.2, 0.0) - 2.0) + (lse(0.0, 1.6, 2.0, 1.92) - 2.0)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    off = info_nce_loss(Q, D, group_size=2, temperature=0.5, doc_text_ids=ids, mask_duplicates=False)
    assert off.mask is None and off.loss.item() == pytest.approx(
        ((lse(2.0, 1.2, 0.0, 0.56) - 2.0) + (lse(0.0, 1.6, 2.0, 1.92) - 2.0)) / 2, abs=1e-6)


def test_query_and_document_negatives_by_hand():
    """Improved contrastive loss: q0's partition adds cos(q0, q1) and cos(pos_0, other docs)."""
    ids = torch.tensor([1, 2, 3, 4])
    out = info_nce_loss(Q, D, group_size=2, temperature=0.5, doc_text_ids=ids, query_negatives=True,
                        query_text_ids=torch.tensor([10, 11]), document_negatives=True)
    # q-q: cos(q0,q1) = 0 -> logit 0 (itself masked); d-d: pos_0 = [1,0] vs neg_0 0.6, pos_1 0, neg_1 0.28
    # pos_1 = [0,1] vs pos_0 0, neg_0 0.8, neg_1 0.96
    loss0 = lse(2.0, 1.2, 0.0, 0.56, 0.0, 1.2, 0.0, 0.56) - 2.0
    loss1 = lse(0.0, 1.6, 2.0, 1.92, 0.0, 0.0, 1.6, 1.92) - 2.0
    assert out.loss.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-5)
    assert out.logits.shape == (2, 4)  # the reported logits are the document candidates only
    # the same query text twice: the other copy is not a negative (and, issue 13, neither is its positive)
    same = info_nce_loss(Q, D, group_size=2, temperature=0.5, query_negatives=True,
                         query_text_ids=torch.tensor([10, 10]))
    siblings = info_nce_loss(Q, D, group_size=2, temperature=0.5, query_text_ids=torch.tensor([10, 10]))
    assert same.loss.item() == pytest.approx(siblings.loss.item(), abs=1e-6)
    assert siblings.loss.item() == pytest.approx(((lse(2.0, 1.2, 0.56) - 2.0) + (lse(1.6, 2.0, 1.92) - 2.0)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="need in_batch_negatives"):
        info_nce_loss(Q, D, group_size=2, in_batch_negatives=False, query_negatives=True)


def test_document_to_query_loss_by_hand_and_its_masks():
    from hfemb.training.loss import document_to_query_loss

    positives = D[0::2]  # [2, 2] pos_0, pos_1
    # pos_0 against (q0, q1): cos [1, 0] -> logits [2, 0], target 0; pos_1: cos [0, 1] -> [0, 2], target 1
    expected = ((lse(2.0, 0.0) - 2.0) + (lse(0.0, 2.0) - 2.0)) / 2
    assert document_to_query_loss(Q, positives, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)
    # the same query text twice, or the same positive text twice: the other is no negative (only its own left)
    for kwargs in ({"query_text_ids": torch.tensor([7, 7])}, {"positive_text_ids": torch.tensor([3, 3])}):
        assert document_to_query_loss(Q, positives, temperature=0.5, **kwargs).item() == pytest.approx(0.0, abs=1e-6)
    # gathered queries (a third from another process at row 0): this process's rows sit at query_offset 1
    q3 = torch.cat([torch.tensor([[0.6, 0.8]]), Q])
    expected = ((lse(1.2, 2.0, 0.0) - 2.0) + (lse(1.6, 0.0, 2.0) - 2.0)) / 2
    got = document_to_query_loss(q3, positives, temperature=0.5, query_offset=1)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # ... where the masks look up this process's ids at the offset: the other process's query has pos_1's text
    got = document_to_query_loss(q3, positives, temperature=0.5, query_offset=1,
                                 positive_text_ids=torch.tensor([5, 4, 5]))
    expected = ((lse(1.2, 2.0, 0.0) - 2.0) + (lse(0.0, 2.0) - 2.0)) / 2
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_plus_document_to_query_is_sentence_transformers_symmetric_mnrl(minilm):
    """(InfoNCE + doc_to_query) / 2 = sentence-transformers' MultipleNegativesRankingLoss with
    directions (query_to_doc, doc_to_query), partition_mode per_direction (the symmetric MNRL), on one batch."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from hfemb.training.loss import document_to_query_loss

    torch.manual_seed(0)
    b, g, dim, temperature = 5, 3, 16, 0.1
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape), dim=-1)  # noqa: E731
    q, pos, negs = unit(b, dim), unit(b, dim), [unit(b, dim) for _ in range(g - 1)]
    d = torch.stack([pos, *negs], dim=1).reshape(b * g, dim)  # hfemb's layout: row i*G is query i's positive
    ours = (info_nce_loss(q, d, group_size=g, temperature=temperature, mask_duplicates=False).loss
            + document_to_query_loss(q, pos, temperature=temperature)) / 2
    st_loss = MultipleNegativesRankingLoss(SentenceTransformer(minilm, device="cpu"), scale=1 / temperature,
                                           directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    theirs = st_loss.compute_loss_from_embeddings([q, pos, *negs], None)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
