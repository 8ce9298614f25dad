"""Teacher scores of training rows: a record's ``pos_scores`` / ``neg_scores`` (from `hfemb mine --teacher`
or FlagEmbedding data) aligned with the negatives a row keeps (read by `hfemb.training.distill`)."""

from __future__ import annotations

from typing import Sequence

from hfemb.errors import DataError


def is_number_list(values, n: int) -> bool:
    """``values`` is a list of ``n`` numbers (int or float, not bool)."""
    return isinstance(values, list) and len(values) == n and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def has_teacher_scores(extra: dict) -> bool:
    """Whether a record's ``extra`` carries teacher scores (``pos_scores`` or ``neg_scores``, not null)."""
    return extra.get("pos_scores") is not None or extra.get("neg_scores") is not None


def row_teacher_scores(extra: dict, source: str | None, positive_index: int, negative_indices: Sequence[int],
                       num_positives: int, num_negatives: int) -> list[float] | None:
    """A training row's teacher scores [1 + N] (its positive's, then its chosen negatives'), from a record's
    ``pos_scores`` / ``neg_scores`` (one per positive / negative, FlagEmbedding's layout); None without them."""
    if not has_teacher_scores(extra):
        return None
    pos, neg = extra.get("pos_scores"), extra.get("neg_scores")
    for name, values, n in (("pos_scores", pos, num_positives), ("neg_scores", neg, num_negatives)):
        if not is_number_list(values, n):
            what = "positive" if name == "pos_scores" else "negative"
            raise DataError(f"expected a list of {n} numbers (one per {what}), got {values!r}"[:200], source,
                            field=name)
    return [float(pos[positive_index])] + [float(neg[k]) for k in negative_indices]
