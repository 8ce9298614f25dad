"""InfoNCE over hard and in-batch negatives, and retrieval metrics of a batch. Pure functions.

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


def info_nce_loss(q: torch.Tensor, d: torch.Tensor, *, group_size: int, temperature: float = 0.05,
                  in_batch_negatives: bool = True, mask_false_negatives: bool = False,
                  false_negative_margin: float = 0.1, doc_text_ids: torch.Tensor | None = None,
                  doc_offset: int | None = None) -> LossOutput:
    """Cross-entropy of each query's positive against its candidates.

    * ``in_batch_negatives=True``: candidates are all B*G documents (logits [B, B*G], label i*G);
      False: only the query's own group (logits [B, G], label 0).
    * ``mask_false_negatives``: a candidate other than the positive itself is dropped (logit set to
      ``MASKED_LOGIT``) when its text equals the positive's (``doc_text_ids`` [B*G], equal id = equal text),
      or when its similarity exceeds the positive's by more than ``false_negative_margin``.
    * ``doc_offset`` (cross-device negatives, in-batch only): ``d`` [M, D] holds the documents of every
      process and this process's B*G documents are rows ``doc_offset .. doc_offset+B*G-1`` of it; labels
      are ``doc_offset + i*G`` and ``doc_text_ids`` covers all M rows. The rows of the logits equal those of
      the single-process loss on the concatenated batch.
    """
    b, g = q.shape[0], group_size
    if doc_offset is not None:
        if not in_batch_negatives:
            raise ValueError("doc_offset (gathered documents) needs in_batch_negatives=True")
        if g < 1 or doc_offset < 0 or doc_offset + b * g > d.shape[0]:
            raise ValueError(f"d has {d.shape[0]} rows; rows {doc_offset}..{doc_offset + b * g - 1} expected")
    elif g < 1 or d.shape[0] != b * g:
        raise ValueError(f"d has {d.shape[0]} rows, expected B*group_size = {b}*{g}")
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
    logits = sims / temperature  # [B, C]
    mask = None
    if mask_false_negatives:
        with torch.no_grad():
            is_positive = F.one_hot(labels, sims.shape[1]).bool()  # [B, C]
            positive_sim = sims.gather(1, labels[:, None])  # [B, 1]
            mask = sims > positive_sim + false_negative_margin  # [B, C]
            if doc_text_ids is not None:
                ids = doc_text_ids.to(q.device).long()  # [M] (B*G without doc_offset)
                candidate_ids = ids.expand(b, -1) if in_batch_negatives else ids.view(b, g)  # [B, C]
                positive_ids = ids[labels] if in_batch_negatives else ids.view(b, g)[:, 0]  # [B]
                mask |= candidate_ids == positive_ids[:, None]
            mask &= ~is_positive
        logits = logits.masked_fill(mask, MASKED_LOGIT)
    loss = F.cross_entropy(logits, labels)
    return LossOutput(loss=loss, logits=logits, labels=labels, mask=mask, similarities=sims)


@torch.no_grad()
def retrieval_metrics(q: torch.Tensor, d: torch.Tensor, group_size: int) -> dict[str, float]:
    """Batch retrieval statistics (no gradient):

    * ``accuracy``: the positive scores strictly above every own hard negative;
    * ``accuracy_in_batch``: ... and above every other document of the batch;
    * ``pos_sim`` / ``neg_sim``: mean cosine of positives / of own hard negatives;
    * ``margin``: mean of (positive - hardest own negative).
    With ``group_size == 1`` (no hard negatives) the negatives are the other queries' positives.
    """
    b, g = q.shape[0], group_size
    if d.shape[0] != b * g:
        raise ValueError(f"d has {d.shape[0]} rows, expected B*group_size = {b}*{g}")
    q, d = q.float(), d.float()
    sims = q @ d.T  # [B, B*G]
    rows = torch.arange(b, device=q.device)
    pos = sims[rows, rows * g]  # [B]
    others = sims.clone()
    others[rows, rows * g] = float("-inf")  # [B, B*G] everything but the own positive
    in_batch_best = others.max(dim=1).values  # [B]
    if g > 1:
        negs = sims.view(b, b, g)[rows, rows, 1:]  # [B, N] own hard negatives
    elif b > 1:
        negs = others.masked_select(torch.isfinite(others)).view(b, b - 1)  # [B, B-1]
    else:
        negs = None
    metrics = {"accuracy_in_batch": float((pos > in_batch_best).float().mean()) if b * g > 1 else 1.0,
               "pos_sim": float(pos.mean())}
    if negs is None:
        metrics["accuracy"] = 1.0
        return metrics
    hardest = negs.max(dim=1).values  # [B]
    metrics.update(accuracy=float((pos > hardest).float().mean()), neg_sim=float(negs.mean()),
                   margin=float((pos - hardest).mean()))
    return metrics
