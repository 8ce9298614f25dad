"""Corpus-retrieval metrics per query (nDCG@k, MRR@k, Recall@k, MAP@k), their bootstrap intervals, and the
threshold sweep over retrieved top-k lists: pure numpy functions.

Conventions (those of pytrec_eval / trec_eval, which BEIR and MTEB call; see README "Corpus retrieval"):

* nDCG@k: gain = the qrels grade (linear, as pytrec_eval's ``ndcg_cut``; grades <= 0 give nothing), discount
  ``1 / log2(rank + 1)`` (rank from 1); the ideal DCG is over ALL judged documents of the query, retrieved
  or not (also judged documents missing from the corpus);
* binary metrics (MRR, Recall, MAP) count a document relevant when its grade >= ``label_threshold`` (1:
  pytrec_eval's default relevance level); Recall@k and MAP@k divide by all relevant judged documents;
* queries with no relevant judged document are left out of the means and counted (BEIR would score them 0);
* the ranking is the search's: score descending, ties broken by corpus order (trec_eval breaks ties by
  document id, descending: only exactly equal scores can differ).
"""

from __future__ import annotations

import numpy as np

from hfemb.evaluation.metrics import resample_weights

RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10", "recall@100", "map@100")


def qrels_arrays(qrels: list[dict[int, int]], n_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys ``query * (n_docs + 1) + doc`` and their grades, for vectorised lookups (doc -1 = not in corpus)."""
    keys, grades = [], []
    for q, judged in enumerate(qrels):
        for d, g in judged.items():
            keys.append(q * (n_docs + 1) + (d if d >= 0 else n_docs))
            grades.append(g)
    keys_arr = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys_arr, kind="stable")
    return keys_arr[order], np.asarray(grades, dtype=np.float64)[order]


def grades_of(ranked: np.ndarray, qrels: list[dict[int, int]], n_docs: int) -> np.ndarray:
    """``[Q, k]`` qrels grades of the ranked document indices (0 when unjudged; index -1 = no document)."""
    keys, grades = qrels_arrays(qrels, n_docs)
    q = np.arange(ranked.shape[0], dtype=np.int64)[:, None]
    wanted = q * (n_docs + 1) + np.where(ranked >= 0, ranked, n_docs)  # [Q, k]
    if len(keys) == 0:
        return np.zeros(ranked.shape)
    pos = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = (keys[pos] == wanted) & (ranked >= 0)
    return np.where(found, grades[pos], 0.0)


def per_query_metrics(ranked: np.ndarray, qrels: list[dict[int, int]], n_docs: int, *,
                      label_threshold: float = 1, ndcg_k: int = 10, mrr_k: int = 10,
                      recall_ks: tuple[int, ...] = (1, 5, 10, 100), map_k: int = 100) -> dict[str, np.ndarray]:
    """Per-query metrics ``{name: [Q] array}`` of ranked document indices ``[Q, k]`` (best first).

    ``qrels[q]`` maps a document index (``-1`` for one not in the corpus) to its grade. A query without a
    relevant judged document gets NaN everywhere (``valid`` is False for it).
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    n_q, k = ranked.shape
    g = grades_of(ranked, qrels, n_docs)  # [Q, k]
    hit = g >= label_threshold  # [Q, k]
    gain = np.clip(g, 0, None)
    n_rel = np.array([sum(1 for v in j.values() if v >= label_threshold) for j in qrels], dtype=np.float64)  # [Q]
    valid = n_rel > 0
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # [k]: rank r (0-based) -> 1/log2(r+2)
    dcg = (gain[:, :ndcg_k] * discount[:ndcg_k]).sum(axis=1)
    ideal_disc = 1.0 / np.log2(np.arange(2, ndcg_k + 2))
    idcg = np.array([(np.sort(np.clip(list(j.values()), 0, None))[::-1][:ndcg_k] * ideal_disc[:min(ndcg_k, len(j))]).sum()
                     if j else 0.0 for j in qrels])
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)
    first = np.where(hit[:, :mrr_k].any(axis=1), hit[:, :mrr_k].argmax(axis=1), mrr_k)
    mrr = np.where(first < mrr_k, 1.0 / (first + 1.0), 0.0)
    out = {f"ndcg@{ndcg_k}": ndcg, f"mrr@{mrr_k}": mrr}
    safe_rel = np.where(valid, n_rel, 1.0)
    for rk in recall_ks:
        out[f"recall@{rk}"] = hit[:, :rk].sum(axis=1) / safe_rel
    hits_map = hit[:, :map_k]
    precision_at = np.cumsum(hits_map, axis=1) / np.arange(1, hits_map.shape[1] + 1)
    out[f"map@{map_k}"] = (precision_at * hits_map).sum(axis=1) / safe_rel
    return {name: np.where(valid, v, np.nan) for name, v in out.items()}


def mean_metrics(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over the queries with a relevant document (NaN rows left out)."""
    return {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in per_query.items()}


def bootstrap_means(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile intervals of the mean of ``values [M, Q]`` (per model, per query) and of each model's paired
    difference from model 0: the same query resamples for every model. Returns ``{"mean": [(lo, hi)] * M,
    "diff": [(lo, hi)] * M}``."""
    values = np.asarray(values, dtype=np.float64)
    n_models, n_q = values.shape
    samples = []
    for w in resample_weights(n_q, n_boot, seed):
        samples.append(w @ values.T / n_q)  # [b, M]
    means = np.concatenate(samples)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    return {"mean": [tuple(float(x) for x in np.percentile(means[:, m], q)) for m in range(n_models)],
            "diff": [tuple(float(x) for x in np.percentile(means[:, m] - means[:, 0], q)) for m in range(n_models)]}


# ---------------------------------------------------------------- threshold sweep over retrieved lists
def topk_confusion(scores: np.ndarray, hit: np.ndarray, n_rel: np.ndarray, threshold: float) -> np.ndarray:
    """``[Q, 3]`` (tp, fp, fn) per query when the retrieved documents with ``score >= threshold`` are predicted
    relevant; relevant documents outside the retrieved list count as false negatives."""
    pred = np.asarray(scores) >= threshold
    tp = (pred & hit).sum(axis=1).astype(np.float64)
    fp = (pred & ~hit).sum(axis=1).astype(np.float64)
    return np.stack([tp, fp, np.asarray(n_rel, dtype=np.float64) - tp], axis=1)


def topk_sweep(scores: np.ndarray, hit: np.ndarray, n_rel: np.ndarray, thresholds) -> list[dict]:
    """Precision, recall and F1 (micro over queries) of ``score >= t`` over the retrieved lists, per threshold."""
    rows = []
    for t in thresholds:
        tp, fp, fn = topk_confusion(scores, hit, n_rel, t).sum(axis=0)
        rows.append({"threshold": float(t), "precision": float(tp / (tp + fp)) if tp + fp else 0.0,
                     "recall": float(tp / (tp + fn)) if tp + fn else 0.0,
                     "f1": float(2 * tp / (2 * tp + fp + fn)) if 2 * tp + fp + fn else 0.0,
                     "tp": int(tp), "fp": int(fp), "fn": int(fn)})
    return rows


def topk_best_f1(scores: np.ndarray, hit: np.ndarray, n_rel: np.ndarray) -> dict:
    """The best F1 of ``score >= t`` over every threshold t (each distinct retrieved score); on equal F1 the
    highest threshold. Returns ``{"f1", "threshold", "precision", "recall"}``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    h = np.asarray(hit, dtype=bool).ravel()
    total = float(np.sum(n_rel))
    if total == 0 or len(s) == 0:
        return {"f1": 0.0, "threshold": float("nan"), "precision": 0.0, "recall": 0.0}
    order = np.argsort(-s, kind="stable")
    s, h = s[order], h[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(h)[last].astype(np.float64)
    fp = (last + 1) - tp
    f1 = 2 * tp / (tp + fp + total)
    i = int(np.argmax(f1))
    return {"f1": float(f1[i]), "threshold": float(s[last[i]]), "precision": float(tp[i] / (tp[i] + fp[i])),
            "recall": float(tp[i] / total)}


def topk_bagged_threshold(scores: np.ndarray, hit: np.ndarray, n_rel: np.ndarray, *, n_boot: int = 200,
                          seed: int = 0) -> float:
    """`topk_best_f1`'s threshold bagged as the pair evaluation's (``metrics.bagged_threshold``, the same seeded
    query resamples): each retrieved document a pair of its query, the unretrieved relevant ones missed."""
    from hfemb.evaluation.metrics import bagged_threshold

    s = np.asarray(scores, dtype=np.float64)
    hit = np.asarray(hit, dtype=bool)
    if float(np.sum(n_rel)) == 0 or s.size == 0:
        return float("nan")
    q, k = s.shape
    return bagged_threshold(np.repeat(np.arange(q), k), hit.ravel().astype(int), s.ravel(), n_boot=n_boot, seed=seed,
                            missed_positives=np.asarray(n_rel, dtype=np.float64) - hit.sum(axis=1))
