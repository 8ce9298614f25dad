"""InfoNCE over hard and in-batch negatives: a pure function (batch statistics: hfemb.training.trainer.per_query_stats).

Shapes: B queries, G = 1 + N documents per query (its positive, then its N hard negatives), D dims.
``q``: [B, D], ``d``: [B*G, D], both L2-normalised; the positive of query i is row ``i*G`` of ``d``.
All similarity and loss math runs in fp32, whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # [] mean cross-entropy over the B queries
    logits: torch.Tensor  # [B, C] similarities / temperature, masked candidates at MASKED_LOGIT (C = B*G or G)
    labels: torch.Tensor  # [B] column of each query's positive
    mask: torch.Tensor | None  # [B, C] bool, True = candidate masked as a false negative (None: masking off)
    similarities: torch.Tensor  # [B, C] fp32 cosine similarities (before temperature and masking)

    @property
    def num_masked(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())


MASKED_LOGIT = torch.finfo(torch.float32).min  # finite: exp() is 0 and logsumexp stays finite (logits are fp32)


def info_nce_loss(q: torch.Tensor, d: torch.Tensor, *, group_size: int, temperature: float = 0.1,
                  in_batch_negatives: bool = True, mask_duplicates: bool = True, mask_false_negatives: bool = False,
                  false_negative_margin: float = 0.1, doc_text_ids: torch.Tensor | None = None,
                  doc_offset: int | None = None, query_negatives: bool = False, document_negatives: bool = False,
                  all_queries: torch.Tensor | None = None, query_text_ids: torch.Tensor | None = None,
                  query_offset: int | None = None, query_positive_ids: torch.Tensor | None = None) -> LossOutput:
    """Cross-entropy of each query's positive against its candidates.

    * ``in_batch_negatives=True``: candidates are all B*G documents (logits [B, B*G], label i*G);
      False: only the query's own group (logits [B, G], label 0).
    * ``mask_duplicates`` (default on): a candidate with the same text as the positive (``doc_text_ids``
      [B*G], equal id = equal text) is no negative; its logit is set to ``MASKED_LOGIT``.
    * Known positives (with ``mask_duplicates``): a candidate that is a positive of the query is no negative
      either -- by text, any id in its row of ``query_positive_ids`` ([B, P] text ids of all the query's
      positives, -1 = padding); and by query, with in-batch negatives, the positive of every row whose
      ``query_text_ids`` equals the query's (several positives of one query in a batch, or on another process).
    * ``mask_false_negatives``: also drop candidates whose similarity exceeds the positive's by more than
      ``false_negative_margin`` (Qwen3-Embedding's mask).
    * ``doc_offset`` (cross-device negatives, in-batch only): ``d`` [M, D] holds the documents of every
      process and this process's B*G documents are rows ``doc_offset .. doc_offset+B*G-1`` of it; labels
      are ``doc_offset + i*G`` and ``doc_text_ids`` covers all M rows. The rows of the logits equal those of
      the single-process loss on the concatenated batch.
    * ``query_negatives`` / ``document_negatives`` (in-batch only; the "improved contrastive loss" of GTE and
      Qwen3-Embedding): the partition function also sums over s(q_i, q_j) for the other queries (``all_queries``
      [Mq, D] with this process's rows at ``query_offset``, default ``q`` itself) and over s(d_i+, d_j) for
      the other documents, with the same masks (the query itself, identical texts by ``query_text_ids`` /
      ``doc_text_ids``, and the margin rule).

    ``LossOutput.logits`` / ``mask`` / ``similarities`` cover the document candidates only.
    """
    b, g = q.shape[0], group_size
    if doc_offset is not None:
        if not in_batch_negatives:
            raise ValueError("doc_offset (gathered documents) needs in_batch_negatives=True")
        if g < 1 or doc_offset < 0 or doc_offset + b * g > d.shape[0]:
            raise ValueError(f"d has {d.shape[0]} rows; rows {doc_offset}..{doc_offset + b * g - 1} expected")
    elif g < 1 or d.shape[0] != b * g:
        raise ValueError(f"d has {d.shape[0]} rows, expected B*group_size = {b}*{g}")
    if (query_negatives or document_negatives) and not in_batch_negatives:
        raise ValueError("query_negatives / document_negatives need in_batch_negatives=True")
    offset = doc_offset or 0
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q, d = q.float(), d.float()
    if in_batch_negatives:
        sims = q @ d.T  # [B, M] (M = B*G, or every process's documents with doc_offset)
        labels = offset + torch.arange(b, device=q.device) * g  # [B]
    else:
        sims = torch.einsum("bd,bgd->bg", q, d.view(b, g, -1))  # [B, G]
        labels = torch.zeros(b, dtype=torch.long, device=q.device)  # [B]
    positive_sim = sims.gather(1, labels[:, None])  # [B, 1]
    doc_ids = doc_text_ids.to(q.device).long() if doc_text_ids is not None else None  # [M]
    positive_ids = None
    if doc_ids is not None:
        positive_ids = doc_ids[labels] if in_batch_negatives else doc_ids.view(b, g)[:, 0]  # [B]
    rows = torch.arange(b, device=q.device)
    known = _known_positives(b, g, sims.shape[1], in_batch_negatives, doc_ids, query_positive_ids, query_text_ids,
                             query_offset) if mask_duplicates else None  # [B, C] or None
    masking = mask_false_negatives or (mask_duplicates and doc_ids is not None) or known is not None

    def candidate_mask(cand_sims, cand_ids, own_ids, self_cols):
        """[B, C] bool: True = not a negative (itself, same text as its own, or above positive + margin)."""
        m = torch.zeros_like(cand_sims, dtype=torch.bool)
        if mask_false_negatives:
            m |= cand_sims > positive_sim + false_negative_margin
        if mask_duplicates and cand_ids is not None and own_ids is not None:
            m |= cand_ids[None, :] == own_ids[:, None] if cand_ids.dim() == 1 else cand_ids == own_ids[:, None]
        m[rows, self_cols] = True  # never its own positive / itself
        return m

    mask = None
    blocks = [sims / temperature]  # [B, C] documents
    if masking:
        with torch.no_grad():
            ids = doc_ids if (doc_ids is None or in_batch_negatives) else doc_ids.view(b, g)  # [M] or [B, G]
            mask = candidate_mask(sims, ids, positive_ids, labels)  # [B, C]
            if known is not None:
                mask |= known
            mask[rows, labels] = False  # the positive itself stays
        blocks[0] = blocks[0].masked_fill(mask, MASKED_LOGIT)
    if query_negatives:
        qs = q if all_queries is None else all_queries.float()  # [Mq, D]
        q_sims = q @ qs.T  # [B, Mq]
        own = (query_offset or 0) + rows  # [B] column of each query itself
        with torch.no_grad():
            q_ids = query_text_ids.to(q.device).long() if query_text_ids is not None else None  # [Mq]
            q_mask = candidate_mask(q_sims, q_ids, q_ids[own] if q_ids is not None else None, own)
        blocks.append((q_sims / temperature).masked_fill(q_mask, MASKED_LOGIT))  # [B, Mq]
    if document_negatives:
        p = d[labels]  # [B, D] each query's positive
        d_sims = p @ d.T  # [B, M]
        with torch.no_grad():
            d_mask = candidate_mask(d_sims, doc_ids, positive_ids, labels)
            if known is not None:
                d_mask |= known
        blocks.append((d_sims / temperature).masked_fill(d_mask, MASKED_LOGIT))  # [B, M]
    all_logits = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]  # [B, C + extra]
    loss = F.cross_entropy(all_logits, labels)
    return LossOutput(loss=loss, logits=blocks[0], labels=labels, mask=mask, similarities=sims)


def document_to_query_loss(queries: torch.Tensor, positives: torch.Tensor, *, temperature: float,
                           query_offset: int = 0, query_text_ids: torch.Tensor | None = None,
                           positive_text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The document -> query direction (sentence-transformers' symmetric MNRL, ``doc_to_query``): cross-entropy of
    each positive ``positives`` [B, D] over every query ``queries`` [Mq, D] (this process's at rows
    ``query_offset`` .. ``query_offset + B - 1``), its own query the target. A query with the same text as its own
    (``query_text_ids`` [Mq]) or whose positive has the same text (``positive_text_ids`` [Mq]) is no negative."""
    b = positives.shape[0]
    rows = torch.arange(b, device=positives.device)
    own = query_offset + rows  # [B] column of each positive's own query
    logits = positives.float() @ queries.float().T / temperature  # [B, Mq]
    with torch.no_grad():
        same = torch.zeros_like(logits, dtype=torch.bool)  # [B, Mq]
        for ids in (query_text_ids, positive_text_ids):
            if ids is not None:
                ids = ids.to(logits.device).long()
                same |= ids[None, :] == ids[own][:, None]
        same[rows, own] = False
    return F.cross_entropy(logits.masked_fill(same, MASKED_LOGIT), own)


def own_negative_mask(out: LossOutput, group_size: int) -> torch.Tensor | None:
    """[B, G-1] bool of ``out.mask`` at each query's own negatives (True = masked: not a negative), or None."""
    if out.mask is None:
        return None
    offsets = torch.arange(1, group_size, device=out.labels.device)  # [G-1] (own group: label 0, columns 1..G-1)
    return out.mask.gather(1, out.labels[:, None] + offsets[None, :])  # [B, G-1]


def _known_positives(b: int, g: int, columns: int, in_batch: bool, doc_ids: torch.Tensor | None,
                     query_positive_ids: torch.Tensor | None, query_text_ids: torch.Tensor | None,
                     query_offset: int | None) -> torch.Tensor | None:
    """[B, C] bool: candidate documents that are a known positive of the query (see `info_nce_loss`), or None
    when nothing identifies them."""
    known = None
    if query_positive_ids is not None and doc_ids is not None:
        kp = query_positive_ids.to(doc_ids.device).long()  # [B, P]
        cand = doc_ids[None, :].expand(b, -1) if in_batch else doc_ids.view(b, g)  # [B, C]
        known = (cand[:, :, None] == kp[:, None, :]).any(dim=-1)  # [B, C]
    if in_batch and query_text_ids is not None:
        all_ids = query_text_ids.long()  # [Mq] every query whose group of G documents is among the candidates
        if all_ids.shape[0] * g != columns:
            raise ValueError(f"query_text_ids has {all_ids.shape[0]} queries for {columns} candidate documents "
                             f"(groups of {g})")
        own = all_ids[(query_offset or 0) + torch.arange(b, device=all_ids.device)]  # [B]
        sibling = torch.zeros(b, columns, dtype=torch.bool, device=all_ids.device)
        sibling[:, torch.arange(all_ids.shape[0], device=all_ids.device) * g] = own[:, None] == all_ids[None, :]
        known = sibling if known is None else known | sibling.to(known.device)
    return known
