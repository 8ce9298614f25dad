"""Threshold-sweep evaluation of several embedding models on labelled (query, document) pairs.

``evaluate({"base": "Qwen/Qwen3-Embedding-0.6B", "tuned": "output/run/merged"}, "test.jsonl", dev_path="dev.jsonl")``
reads the pairs (any eval format ``hfemb.data.formats.read_records`` knows), encodes each distinct text once per
model (queries and documents apart, since their prompts differ; an on-disk cache makes re-runs free),
scores pairs by cosine similarity, and reports per model: precision/recall/F1/accuracy at each threshold
(``score >= threshold`` is positive), best F1 over all thresholds (sklearn's PR curve), ROC-AUC, AP,
MRR@10/nDCG@10/Recall@k per query, the threshold to deploy (chosen on ``dev`` when given, else on the
eval set itself: optimistic; by default the bagged median of resampled best-F1 thresholds) with bootstrap intervals. Models are loaded and encoded by
``hfemb.evaluation.encoders`` (cache: ``hfemb.evaluation.cache``); files are written by ``hfemb.evaluation.report``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from hfemb.data.formats import read_records
from hfemb.data.records import labelled_documents
from hfemb.data.splits import split_by_query
from hfemb.errors import ConfigError, HfembError
from hfemb.evaluation import metrics
from hfemb.evaluation.encoders import encode_or_skip
from hfemb.evaluation.report import write_report
from hfemb.evaluation.settings import EvalSettings


# ------------------------------------------------------------------------------------------- data
@dataclass
class EvalPairs:
    """Labelled (query, document) pairs over distinct texts; ``query_index`` doubles as the query group."""

    queries: list[str]
    documents: list[str]
    query_index: np.ndarray  # [P] int
    doc_index: np.ndarray  # [P] int
    labels: np.ndarray  # [P] int (graded as given)
    stats: dict


def pairs_from_records(records, *, label_threshold: int = 1) -> EvalPairs:
    """``candidates`` when a record has them, else positives (label 1) + negatives (label 0).

    Records with the same query (mined rows: one per positive) form one query. A repeated
    (query, document) pair is kept once; if its labels disagree the highest wins (counted).
    """
    q_ids: dict[str, int] = {}
    d_ids: dict[str, int] = {}
    pair_label: dict[tuple[int, int], int] = {}
    duplicates = conflicts = 0
    for rec in records:
        qi = q_ids.setdefault(rec.query, len(q_ids))
        for text, label in labelled_documents(rec):
            key = (qi, d_ids.setdefault(text, len(d_ids)))
            if key in pair_label:
                duplicates += 1
                if pair_label[key] != int(label):
                    conflicts += 1
                    pair_label[key] = max(pair_label[key], int(label))
            else:
                pair_label[key] = int(label)
    keys = np.array(list(pair_label), dtype=np.int64).reshape(-1, 2)
    labels = np.fromiter(pair_label.values(), dtype=np.int64, count=len(pair_label))
    relevant = labels >= label_threshold
    stats = {"records": len(records), "queries": len(q_ids), "documents": len(d_ids), "pairs": int(len(labels)),
             "positive_pairs": int(relevant.sum()), "negative_pairs": int((~relevant).sum()),
             "queries_with_positive": int(len(np.unique(keys[relevant, 0]))) if len(keys) else 0,
             "duplicate_pairs_dropped": duplicates, "label_conflicts": conflicts,
             "label_values": {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}}
    return EvalPairs(list(q_ids), list(d_ids), keys[:, 0], keys[:, 1], labels, stats)


def read_eval_records(path, settings: EvalSettings):
    """``read_records`` with the settings' format, bad-row policy and label threshold."""
    return read_records(path, fmt=settings.data_format, on_error=settings.on_error,
                        label_threshold=settings.label_threshold, bad_label=settings.bad_label)


def make_pairs(records, settings: EvalSettings, *, path, read_result=None, part: str | None = None) -> EvalPairs:
    pairs = pairs_from_records(records, label_threshold=settings.label_threshold)
    meta = {"path": str(path) + (f" ({part})" if part else "")}
    if read_result is not None:
        meta.update({"format": read_result.format, "rows": read_result.rows, "skipped_rows": len(read_result.skipped),
                     "first_skipped": str(read_result.skipped[0]) if read_result.skipped else None})
    pairs.stats = {**meta, **pairs.stats}
    if pairs.stats["positive_pairs"] == 0:
        raise HfembError(f"{meta['path']}: no relevant pair (label >= {settings.label_threshold}); "
                         "check --label-threshold")
    if pairs.stats["negative_pairs"] == 0:  # every pair relevant: any low threshold scores F1 1.0, meaningless
        raise HfembError(f"{meta['path']}: no irrelevant pair (label < {settings.label_threshold}), so precision, "
                         "F1 and the threshold cannot be measured (any low threshold scores F1 1.000); add "
                         "labelled negatives (e.g. mined ones: `hfemb mine`) or check --label-threshold")
    return pairs


def load_pairs(path, settings: EvalSettings) -> EvalPairs:
    result = read_eval_records(path, settings)
    return make_pairs(result.records, settings, path=path, read_result=result)


def cosine_scores(pairs: EvalPairs, q_emb: np.ndarray, d_emb: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Row-wise dot products of normalised vectors, in float64, chunked to bound memory."""
    out = np.empty(len(pairs.labels), dtype=np.float64)
    for s in range(0, len(out), chunk):
        qi, di = pairs.query_index[s:s + chunk], pairs.doc_index[s:s + chunk]
        out[s:s + chunk] = np.einsum("ij,ij->i", q_emb[qi].astype(np.float64), d_emb[di].astype(np.float64))
    return out


# ------------------------------------------------------------------------------------------ metrics
def summary_metrics(pairs: EvalPairs, scores: np.ndarray, settings: EvalSettings) -> dict:
    """Sweep, best F1 (PR curve), ROC-AUC, AP and, when queries have several candidates, ranking metrics."""
    lt = settings.label_threshold
    best = metrics.best_f1(pairs.labels, scores, label_threshold=lt)
    out = {"sweep": [{k: row[k] for k in ("threshold", "precision", "recall", "f1", "accuracy", "positive_rate")}
                     for row in metrics.threshold_sweep(pairs.labels, scores, settings.thresholds, label_threshold=lt)],
           "best_f1": best["f1"], "best_threshold": best["threshold"],
           "best_precision": best["precision"], "best_recall": best["recall"],
           "roc_auc": metrics.roc_auc(pairs.labels, scores, label_threshold=lt),
           "average_precision": metrics.average_precision(pairs.labels, scores, label_threshold=lt)}
    grouped = len(pairs.labels) > len(pairs.queries)  # some query has more than one candidate
    out["ranking"] = metrics.grouped_metrics(pairs.query_index, pairs.labels, scores, label_threshold=lt) \
        if grouped else None
    return out


def choose_thresholds(results: dict, eval_pairs: EvalPairs, eval_scores: dict, dev_pairs: EvalPairs | None,
                      dev_scores: dict, settings: EvalSettings) -> None:
    """Per model: the threshold to deploy (on dev, else on eval; by ``settings.threshold_rule``: the bagged
    median of resampled best-F1 thresholds, or the best-F1 threshold itself), eval F1 there, bootstrap intervals."""
    lt, names = settings.label_threshold, list(eval_scores)
    confusions = []
    for name in names:
        res = results[name]
        if dev_pairs is not None:
            res["dev"] = summary_metrics(dev_pairs, dev_scores[name], settings)
            chosen, source_pairs, source_scores = res["dev"]["best_threshold"], dev_pairs, dev_scores[name]
        else:
            chosen, source_pairs, source_scores = res["best_threshold"], eval_pairs, eval_scores[name]
        if settings.threshold_rule == "bagged" and chosen == chosen:  # (NaN: no relevant pair to choose by)
            chosen = metrics.bagged_threshold(source_pairs.query_index, source_pairs.labels, source_scores,
                                              label_threshold=lt, n_boot=settings.threshold_bags, seed=settings.seed)
        (row,) = metrics.threshold_sweep(eval_pairs.labels, eval_scores[name], [chosen], label_threshold=lt)
        res.update({"chosen_threshold": chosen, "chosen_on": "dev" if dev_pairs is not None else "eval",
                    "threshold_rule": settings.threshold_rule,
                    "f1_at_chosen": row["f1"], "precision_at_chosen": row["precision"],
                    "recall_at_chosen": row["recall"], "accuracy_at_chosen": row["accuracy"]})
        if settings.n_bootstrap:
            res["chosen_threshold_ci"] = list(metrics.bootstrap_best_threshold(
                source_pairs.query_index, source_pairs.labels, source_scores, label_threshold=lt,
                n_boot=settings.n_bootstrap, seed=settings.seed))
        confusions.append(metrics.query_confusion(eval_pairs.query_index, eval_pairs.labels, eval_scores[name],
                                                  chosen, label_threshold=lt, n_groups=len(eval_pairs.queries)))
    if settings.n_bootstrap and names:
        ci = metrics.bootstrap_f1(confusions, n_boot=settings.n_bootstrap, seed=settings.seed)
        first = results[names[0]]["f1_at_chosen"]
        for i, name in enumerate(names):
            results[name]["f1_at_chosen_ci"] = list(ci["f1"][i])
            results[name]["f1_diff_vs_first"] = results[name]["f1_at_chosen"] - first
            results[name]["f1_diff_vs_first_ci"] = list(ci["diff"][i])


# --------------------------------------------------------------------------------------- entry point
def evaluate(models: dict[str, str], data_path, *, dev_path=None, split_dev: float | None = None,
             thresholds="0.4:0.7", output_dir="eval_output", settings: EvalSettings | None = None,
             print_table: bool = True, **options) -> dict:
    """Evaluate ``models`` ({name: Hub id | folder | adapter folder | openai:MODEL@URL}); write the report.

    ``dev_path``: choose each model's threshold there; or ``split_dev=F``: hold out a fraction F of the
    eval file's queries (seeded) as dev. ``options`` are ``EvalSettings`` fields. Returns the
    ``results.json`` content. The first model is the reference for the paired F1 differences.
    """
    if not models:
        raise ConfigError("no model to evaluate")
    if dev_path and split_dev:
        raise ConfigError("give either a dev file or a dev split fraction, not both")
    settings = settings or EvalSettings(thresholds=thresholds, **options)
    started = time.perf_counter()
    if split_dev:
        result = read_eval_records(data_path, settings)
        dev_records, test_records = split_by_query(result.records, split_dev, settings.seed)
        eval_pairs = make_pairs(test_records, settings, path=data_path, read_result=result, part="test split")
        dev_pairs = make_pairs(dev_records, settings, path=data_path, part=f"dev split {split_dev:g}")
    else:
        eval_pairs = load_pairs(data_path, settings)
        dev_pairs = load_pairs(dev_path, settings) if dev_path else None
    query_texts = list(dict.fromkeys(eval_pairs.queries + (dev_pairs.queries if dev_pairs else [])))
    doc_texts = list(dict.fromkeys(eval_pairs.documents + (dev_pairs.documents if dev_pairs else [])))
    q_pos = {t: i for i, t in enumerate(query_texts)}
    d_pos = {t: i for i, t in enumerate(doc_texts)}

    results: dict[str, dict] = {}
    eval_scores: dict[str, np.ndarray] = {}
    dev_scores: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for name, spec in models.items():
        encoded = encode_or_skip(spec, name, query_texts, doc_texts, settings, failed)
        if encoded is None:
            continue
        for pairs, store in ((eval_pairs, eval_scores), (dev_pairs, dev_scores)):
            if pairs is not None:
                q = encoded.queries[[q_pos[t] for t in pairs.queries]]
                d = encoded.documents[[d_pos[t] for t in pairs.documents]]
                store[name] = cosine_scores(pairs, q, d)
        results[name] = {"model": spec, **encoded.info, **summary_metrics(eval_pairs, eval_scores[name], settings)}
    if not results:
        raise HfembError("every model failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    choose_thresholds(results, eval_pairs, eval_scores, dev_pairs, dev_scores, settings)

    report = {
        "models": results,
        "failed_models": failed,
        "reference_model": next(iter(results)),
        "data": {"eval": eval_pairs.stats, "dev": dev_pairs.stats if dev_pairs else None},
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("show_progress", "plots")},
                     "rule": "score >= threshold is predicted positive; score = cosine similarity",
                     "relevant": f"label >= {settings.label_threshold}", "dev_split": split_dev},
        "seconds": round(time.perf_counter() - started, 3),
    }
    markdown = write_report(report, output_dir, eval_scores=eval_scores, eval_labels=eval_pairs.labels,
                            plots=settings.plots)
    if print_table:
        print(markdown)
    return report
