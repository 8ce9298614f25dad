"""Teacher distillation, pair-ranking (CoSENT) and Matryoshka terms of the training loss: pure functions beside `info_nce_loss`.

Shapes: B queries, G = 1 + N documents per query (its positive, then its N negatives), D dims.
``q``: [B, D]; ``d``: [M, D] holding this process's B*G documents at rows ``doc_offset .. doc_offset+B*G-1``
(M = B*G in one process; every process's documents with cross-device negatives); ``teacher_scores``: [B, G],
the teacher's similarity of each query to its own G documents (positive first), as `hfemb mine --teacher`
writes them (``pos_scores`` + ``neg_scores``).

Distillation is KL(teacher || student) over each row's own G candidates, both distributions a softmax of
the scores divided by the same ``temperature`` (FlagEmbedding's ``kl_div`` distillation; sentence-transformers'
``DistillKLDivLoss`` without its temperature**2 factor): zero exactly when the student's similarities equal
the teacher's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def own_group_similarities(q: torch.Tensor, d: torch.Tensor, group_size: int, doc_offset: int | None = None
                           ) -> torch.Tensor:
    """[B, G] fp32 cosine of each query with its own positive and negatives (rows of ``d`` from ``doc_offset``)."""
    b, g = q.shape[0], group_size
    start = doc_offset or 0
    if start < 0 or start + b * g > d.shape[0]:
        raise ValueError(f"d has {d.shape[0]} rows; rows {start}..{start + b * g - 1} expected")
    own = d[start:start + b * g].float().view(b, g, -1)  # [B, G, D]
    return torch.einsum("bd,bgd->bg", q.float(), own)  # [B, G]


def _teacher_beside(student: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """``teacher_scores`` as fp32 on the student's device, checked to be [B, G] like ``student``."""
    teacher = teacher_scores.to(student.device).float()  # [B, G]
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_scores has shape {tuple(teacher.shape)}, expected {tuple(student.shape)}")
    return teacher


def distill_kl_loss(q: torch.Tensor, d: torch.Tensor, teacher_scores: torch.Tensor, *, group_size: int,
                    temperature: float = 0.05, doc_offset: int | None = None) -> torch.Tensor:
    """Mean over the B queries of KL(p_teacher || p_student), p = softmax(scores / temperature) over G."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = own_group_similarities(q, d, group_size, doc_offset)  # [B, G]
    teacher = _teacher_beside(student, teacher_scores) / temperature  # [B, G]
    student = student / temperature
    log_p = F.log_softmax(teacher, dim=-1)  # [B, G]
    log_q = F.log_softmax(student, dim=-1)  # [B, G]
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()  # []


def distill_mse_loss(q: torch.Tensor, d: torch.Tensor, teacher_scores: torch.Tensor, *, group_size: int,
                     doc_offset: int | None = None) -> torch.Tensor:
    """Mean over the B*G (query, document) pairs of (student cosine - teacher cosine)^2: unlike the KL, it
    also transfers the teacher's absolute scale (a cosine threshold means the same across queries)."""
    student = own_group_similarities(q, d, group_size, doc_offset)  # [B, G]
    return F.mse_loss(student, _teacher_beside(student, teacher_scores))  # []


def pair_rank_loss(q: torch.Tensor, d: torch.Tensor, *, group_size: int, scale: float = 20.0,
                   doc_offset: int | None = None, negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CoSENT over the batch: log(1 + sum over every (positive pair, negative pair) of exp(scale * (s_neg - s_pos))).

    Unlike InfoNCE, which compares a query's candidates with each other, this compares pairs *across*
    queries: every query's positive should score above every query's own negatives, so one threshold on
    the cosine separates relevant from irrelevant pairs (the ROC-AUC of the batch's pairs; Su's CoSENT,
    sentence-transformers' ``CoSENTLoss`` on (query, document, label) pairs). ``negative_mask`` [B, G-1]
    True = not a negative (e.g. a duplicate of the positive's text); those pairs are left out.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    sims = own_group_similarities(q, d, group_size, doc_offset)  # [B, G]
    pos, neg = sims[:, 0], sims[:, 1:]  # [B], [B, G-1]
    if neg.numel() == 0:
        return sims.new_zeros(())
    neg = neg.reshape(-1)  # [B*(G-1)]
    diff = scale * (neg[None, :] - pos[:, None])  # [B, B*(G-1)] every positive against every negative
    if negative_mask is not None:
        diff = diff.masked_fill(negative_mask.reshape(1, -1).to(diff.device), float("-inf"))
    zero = diff.new_zeros(1)
    return torch.logsumexp(torch.cat([zero, diff.reshape(-1)]), dim=0)  # []


def truncate_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[n, D] -> [n, dim]: the first ``dim`` coordinates, re-normalised to unit length (Matryoshka)."""
    return F.normalize(x[:, :dim].float(), p=2, dim=-1)


def matryoshka_loss(q: torch.Tensor, d: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    dims: Sequence[int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """sum_k w_k * loss_fn(q[:, :dim_k] normalised, d[:, :dim_k] normalised) (sentence-transformers'
    ``MatryoshkaLoss``; weights default to 1). A dimension above D uses all D (the full embedding)."""
    weights = list(weights) if weights is not None else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dimensions")
    total = None
    for dim, w in zip(dims, weights):
        term = w * loss_fn(truncate_normalize(q, dim), truncate_normalize(d, dim))
        total = term if total is None else total + term
    return total



MATRYOSHKA_FILE = "matryoshka.json"


def write_matryoshka_info(model_dir, dims: Sequence[int], weights: Sequence[float] | None) -> None:
    """``model_dir/matryoshka.json``: the dimensions the model was trained to be truncated to."""
    from pathlib import Path

    from hfemb.io_utils import write_json

    if Path(model_dir).is_dir():
        write_json(Path(model_dir) / MATRYOSHKA_FILE, {
            "dims": list(dims), "weights": list(weights) if weights is not None else [1.0] * len(dims),
            "use": "run_eval.py --truncate-dim N, or SentenceTransformer(path, truncate_dim=N)"})
