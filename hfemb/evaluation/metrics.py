"""Evaluation metrics: pure, vectorised functions on numpy arrays.

Conventions used throughout:

* a pair is predicted positive when ``score >= threshold`` (the same rule sklearn's
  ``precision_recall_curve`` uses, so a best-F1 threshold read off that curve reproduces its F1);
* ``labels`` may be graded (0/1/2, ...); a pair is relevant when ``label >= label_threshold``;
* precision of an empty prediction set is 0 (sklearn's ``zero_division=0``);
* grouped (ranking) metrics rank each query's candidates by descending score, ties broken by input
  order; queries without a relevant candidate are excluded and counted.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import numpy as np

from hfemb.errors import ConfigError

MAX_THRESHOLDS = 1000


# ----------------------------------------------------------------------------------------------
# thresholds
def parse_thresholds(spec: str) -> list[float]:
    """``"0.4:0.7"`` -> [0.4, 0.5, 0.6, 0.7]; ``"0.4:0.7:0.05"``; ``"0.4,0.45,0.5"``.

    Decimal arithmetic, so the stop value is included and no ``0.30000000000000004`` appears.
    Thresholds must lie in [-1, 1] (cosine similarity); a malformed spec raises ``ConfigError``
    naming the bad part.
    """
    text = str(spec).strip()
    if not text:
        raise ConfigError("thresholds: empty; expected START:STOP[:STEP] (e.g. 0.4:0.7) or a list (0.4,0.45,0.5)")

    def number(part: str, what: str) -> Decimal:
        try:
            value = Decimal(part.strip())
        except InvalidOperation:
            raise ConfigError(f"thresholds {text!r}: {what} {part.strip()!r} is not a number") from None
        if not value.is_finite():
            raise ConfigError(f"thresholds {text!r}: {what} {part.strip()!r} is not a finite number")
        return value

    if ":" in text:
        if "," in text:
            raise ConfigError(f"thresholds {text!r}: use either START:STOP[:STEP] or a comma-separated list, not both")
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(f"thresholds {text!r}: expected START:STOP or START:STOP:STEP, got {len(parts)} fields")
        start, stop = number(parts[0], "start"), number(parts[1], "stop")
        step = number(parts[2], "step") if len(parts) == 3 else Decimal("0.1")
        if step <= 0:
            raise ConfigError(f"thresholds {text!r}: step {parts[2].strip()!r} must be > 0")
        if start > stop:
            raise ConfigError(f"thresholds {text!r}: start {parts[0].strip()} is greater than stop {parts[1].strip()}")
        count = int((stop - start) / step) + 1
        if count > MAX_THRESHOLDS:
            raise ConfigError(f"thresholds {text!r}: {count} thresholds; at most {MAX_THRESHOLDS} (use a larger step)")
        values = [start + i * step for i in range(count)]
    else:
        values = [number(part, "value") for part in text.split(",")]
        if any(not part.strip() for part in text.split(",")):
            raise ConfigError(f"thresholds {text!r}: empty value in the list")
    for value in values:
        if not Decimal(-1) <= value <= Decimal(1):
            raise ConfigError(f"thresholds {text!r}: {value} is outside [-1, 1] (cosine similarity)")
    return sorted({float(v) for v in values})


# ----------------------------------------------------------------------------------------------
# threshold metrics
def _as_binary(labels, label_threshold: float = 1) -> np.ndarray:
    return np.asarray(labels, dtype=np.float64) >= label_threshold


def threshold_sweep(labels, scores, thresholds, *, label_threshold: float = 1) -> list[dict]:
    """Precision, recall, F1, accuracy and predicted-positive rate at each threshold (``score >= t``)."""
    y = _as_binary(labels, label_threshold)
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(list(thresholds), dtype=np.float64)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tp = (len(pos) - np.searchsorted(pos, t, side="left")).astype(np.float64)  # positives with score >= t
    fp = (len(neg) - np.searchsorted(neg, t, side="left")).astype(np.float64)
    fn, tn = len(pos) - tp, len(neg) - fp
    n = max(len(s), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(len(pos) > 0, tp / max(len(pos), 1), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    rows = []
    for i, threshold in enumerate(t):
        rows.append({
            "threshold": float(threshold), "precision": float(precision[i]), "recall": float(recall[i]),
            "f1": float(f1[i]), "accuracy": float((tp[i] + tn[i]) / n),
            "positive_rate": float((tp[i] + fp[i]) / n),
            "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "tn": int(tn[i]),
        })
    return rows


def pr_curve(labels, scores, *, label_threshold: float = 1) -> dict:
    """sklearn's precision-recall curve with the F1 at each threshold (``thresholds`` ascending)."""
    from sklearn.metrics import precision_recall_curve

    y = _as_binary(labels, label_threshold)
    precision, recall, thresholds = precision_recall_curve(y.astype(int), np.asarray(scores, dtype=np.float64))
    p, r = precision[:-1], recall[:-1]  # the last point (P=1, R=0) has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return {"precision": precision, "recall": recall, "thresholds": thresholds, "f1": f1}


def best_f1(labels, scores, *, label_threshold: float = 1) -> dict:
    """The best F1 over all thresholds, from sklearn's precision-recall curve.

    Returns ``{"f1", "threshold", "precision", "recall"}``; predicting ``score >= threshold``
    reproduces that F1 exactly. On equal F1 the lowest such threshold is returned.
    """
    y = _as_binary(labels, label_threshold)
    if not y.any():
        return {"f1": 0.0, "threshold": float("nan"), "precision": 0.0, "recall": 0.0}
    curve = pr_curve(y, scores, label_threshold=1)
    i = int(np.argmax(curve["f1"]))
    return {"f1": float(curve["f1"][i]), "threshold": float(curve["thresholds"][i]),
            "precision": float(curve["precision"][i]), "recall": float(curve["recall"][i])}


def roc_auc(labels, scores, *, label_threshold: float = 1) -> float:
    """ROC-AUC (sklearn); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = _as_binary(labels, label_threshold)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y.astype(int), np.asarray(scores, dtype=np.float64)))


def average_precision(labels, scores, *, label_threshold: float = 1) -> float:
    """Average precision (sklearn); NaN without positives."""
    from sklearn.metrics import average_precision_score

    y = _as_binary(labels, label_threshold)
    if not y.any():
        return float("nan")
    return float(average_precision_score(y.astype(int), np.asarray(scores, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------
# ranking metrics per query
def _group_starts(sorted_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of runs of equal ids in a sorted array, and each element's run index."""
    starts = np.r_[0, np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1]
    run = np.cumsum(np.r_[0, (sorted_groups[1:] != sorted_groups[:-1]).astype(np.int64)])
    return starts, run


def grouped_metrics(group_ids, labels, scores, *, label_threshold: float = 1, k: int = 10,
                    recall_ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """MRR@k, nDCG@k (graded, linear gains = label) and Recall@k per query, averaged over queries.

    Recall@k = relevant candidates in the top k / relevant candidates of the query. Queries with no
    relevant candidate are excluded and counted in ``queries_without_positive``.
    """
    g = np.asarray(group_ids)
    rel = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    if n == 0:
        raise ValueError("grouped_metrics: no rows")
    idx = np.arange(n)
    order = np.lexsort((idx, -s, g))  # by query, then score descending, then input order
    starts, run = _group_starts(g[order])
    rank = idx - starts[run]  # 0-based rank of order[i] within its query
    gain = np.clip(rel[order], 0, None)
    hit = rel[order] >= label_threshold
    n_groups = len(starts)
    n_rel = np.bincount(run, weights=hit, minlength=n_groups)
    valid = n_rel > 0

    first_hit = np.minimum.reduceat(np.where(hit, rank, n), starts)
    mrr = np.where(first_hit < k, 1.0 / (first_hit + 1.0), 0.0)

    discount = 1.0 / np.log2(rank + 2.0)
    dcg = np.bincount(run, weights=np.where(rank < k, gain * discount, 0.0), minlength=n_groups)
    ideal_order = np.lexsort((-rel, g))  # same query runs, gains descending
    ideal_gain = np.clip(rel[ideal_order], 0, None)
    idcg = np.bincount(run, weights=np.where(rank < k, ideal_gain * discount, 0.0), minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(idcg > 0, dcg / idcg, 0.0)

    out = {f"mrr@{k}": float(mrr[valid].mean()) if valid.any() else float("nan"),
           f"ndcg@{k}": float(ndcg[valid].mean()) if valid.any() else float("nan")}
    for rk in recall_ks:
        found = np.bincount(run, weights=hit & (rank < rk), minlength=n_groups)
        out[f"recall@{rk}"] = float((found[valid] / n_rel[valid]).mean()) if valid.any() else float("nan")
    out["queries"] = int(valid.sum())
    out["queries_without_positive"] = int((~valid).sum())
    return out


# ----------------------------------------------------------------------------------------------
# bootstrap over queries
def query_confusion(group_ids, labels, scores, threshold: float, *, label_threshold: float = 1,
                    n_groups: int | None = None) -> np.ndarray:
    """``[n_groups, 3]`` counts of (tp, fp, fn) per query at ``score >= threshold``; ids are 0..n_groups-1."""
    g = np.asarray(group_ids, dtype=np.int64)
    y = _as_binary(labels, label_threshold)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    n_groups = int(g.max()) + 1 if n_groups is None else n_groups
    return np.stack([np.bincount(g, weights=pred & y, minlength=n_groups),
                     np.bincount(g, weights=pred & ~y, minlength=n_groups),
                     np.bincount(g, weights=~pred & y, minlength=n_groups)], axis=1)


def f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """counts [..., 3] (tp, fp, fn) -> F1 [...]."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, 0.0)


def resample_weights(n_groups: int, n_boot: int, seed: int, chunk: int = 200):
    """Yield ``[b, n_groups]`` multinomial counts: how often each query is drawn in a resample."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        yield rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=b).astype(np.float64)
        done += b


def bootstrap_f1(confusions: list[np.ndarray], *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile bootstrap intervals for F1 of each model and for its difference from model 0.

    ``confusions``: one ``[n_groups, 3]`` array per model (from ``query_confusion``) over the SAME
    queries. Queries are resampled with replacement (seeded), the same resample for every model
    (paired), so the difference interval accounts for the correlation between models.
    Returns ``{"f1": [(lo, hi), ...], "diff": [(lo, hi), ...]}`` (``diff[0]`` is (0, 0)).
    """
    stacked = np.stack(confusions)  # [M, Q, 3]
    n_models, n_groups, _ = stacked.shape
    samples = []
    for weights in resample_weights(n_groups, n_boot, seed):
        counts = np.einsum("bq,mqc->bmc", weights, stacked)  # [b, M, 3]
        samples.append(f1_from_counts(counts))
    f1 = np.concatenate(samples)  # [B, M]
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    f1_ci = [tuple(float(v) for v in np.percentile(f1[:, m], q)) for m in range(n_models)]
    diff_ci = [tuple(float(v) for v in np.percentile(f1[:, m] - f1[:, 0], q)) for m in range(n_models)]
    return {"f1": f1_ci, "diff": diff_ci}


def bootstrap_best_thresholds(group_ids, labels, scores, *, label_threshold: float = 1, n_boot: int = 1000,
                              seed: int = 0, missed_positives=None) -> np.ndarray:
    """[n_boot] best-F1 threshold of each resample of the queries (``resample_weights``: seeded counts); NaN for
    a resample without a relevant pair (no F1 to maximise). ``missed_positives`` [n_groups]: relevant items of
    each query that are not among the rows (a retrieval run's unretrieved ones), false negatives at every
    threshold."""
    g = np.asarray(group_ids, dtype=np.int64)
    y = _as_binary(labels, label_threshold).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    g, y, s = g[order], y[order], s[order]
    block_end = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each distinct score
    n_groups = int(g.max()) + 1
    missed = np.zeros(n_groups) if missed_positives is None else np.asarray(missed_positives, dtype=np.float64)
    best = []
    for weights in resample_weights(n_groups, n_boot, seed, chunk=max(1, min(200, 2_000_000 // max(len(s), 1)))):
        w = weights[:, g]  # [b, n] row weights
        tp = np.cumsum(w * y, axis=1)[:, block_end]  # predicted positive = score >= s[block_end]
        fp = np.cumsum(w * (1 - y), axis=1)[:, block_end]
        n_pos = tp[:, -1:] + (weights @ missed)[:, None]  # [b, 1] relevant items of the resample
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(tp + fp + n_pos > 0, 2 * tp / (tp + fp + n_pos), 0.0)
        best.append(np.where(n_pos[:, 0] > 0, s[block_end][np.argmax(f1, axis=1)], np.nan))
    return np.concatenate(best)


def bootstrap_best_threshold(group_ids, labels, scores, *, label_threshold: float = 1, n_boot: int = 1000,
                             seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the best-F1 threshold when queries are resampled: how stable the choice is."""
    values = bootstrap_best_thresholds(group_ids, labels, scores, label_threshold=label_threshold, n_boot=n_boot,
                                       seed=seed)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bagged_threshold(group_ids, labels, scores, *, label_threshold: float = 1, n_boot: int = 200,
                     seed: int = 0, missed_positives=None) -> float:
    """The threshold to deploy by bagging: the median of the best-F1 thresholds of ``n_boot`` resamples of the
    queries. The plain argmax of one F1 curve often sits at the edge of a flat, noisy plateau; the median of
    its resamples sits inside it and transfers better to new queries (hfemb's default rule, README).
    ``missed_positives``: see `bootstrap_best_thresholds`."""
    y = _as_binary(labels, label_threshold)
    if not y.any() and (missed_positives is None or not np.any(missed_positives)):
        return float("nan")
    values = bootstrap_best_thresholds(group_ids, labels, scores, label_threshold=label_threshold, n_boot=n_boot,
                                       seed=seed, missed_positives=missed_positives)
    values = values[~np.isnan(values)]  # resamples that drew no relevant pair choose nothing
    return float(np.median(values)) if len(values) else best_f1(y, scores)["threshold"]
