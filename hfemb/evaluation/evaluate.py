"""Threshold-sweep evaluation of several embedding models on labelled (query, document) pairs.

``evaluate({"base": "Qwen/Qwen3-Embedding-0.6B", "tuned": "output/run/merged"}, "test.jsonl", dev_path="dev.jsonl")``
reads the pairs (any eval format ``hfemb.data.formats.read_records`` knows), encodes each distinct text once per
model (queries and documents apart, since their prompts differ; an on-disk cache makes re-runs free),
scores pairs by cosine similarity, and reports per model: precision/recall/F1/accuracy at each threshold
(``score >= threshold`` is positive), best F1 over all thresholds (sklearn's PR curve), ROC-AUC, AP,
MRR@10/nDCG@10/Recall@k per query, the threshold to deploy (best F1 on ``dev`` when given, else on the
eval set itself: optimistic) with bootstrap intervals. Models are loaded and encoded by
``hfemb.evaluation.encoders`` (cache: ``hfemb.evaluation.cache``); files are written by ``hfemb.evaluation.report``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from hfemb.evaluation import metrics
from hfemb.errors import ConfigError, HfembError
from hfemb.evaluation.encoders import (DEFAULT_BASE_MODELS, EncodedTexts, default_models, encode_texts,  # noqa: F401
                               latest_training_output, load_encoder, model_fingerprint, parse_model_args,
                               resolve_model_path)


@dataclass
class EvalSettings:
    """Everything that shapes an evaluation run besides the models and files (recorded in results.json)."""

    thresholds: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6, 0.7])
    label_threshold: int = 1  # a pair is relevant when label >= this (KUAKE-QQR: 2)
    data_format: str = "auto"
    on_error: str = "raise"  # bad data rows: "raise" or "skip" (counted in the report)
    bad_label: str = "error"  # rows with a label such as "NA": "error" (see on_error) or "skip"
    instruction: str | bool | None = None  # None: each model's default; str: task for all; False: no prompt
    symmetric: bool = False  # documents get the query prompt too
    pooling: str | None = None
    dtype: str = "auto"  # bf16 on a bf16 GPU, fp32 on CPU
    quantization: str | None = None  # "4bit" | "8bit" (bitsandbytes, CUDA)
    padding_free: bool | str | None = None  # packed batches (hfemb.modeling.packing): auto (None) | true | false
    device: str | None = None
    max_length: int = 512
    truncate_dim: int | None = None
    batch_size: int = 32
    max_tokens_per_batch: int | None = 16384  # batches by token budget, texts sorted by length
    trust_remote_code: bool = False
    cache_dir: str | None = None
    use_cache: bool = True
    n_bootstrap: int = 1000
    seed: int = 0
    api_key_env: str = "OPENAI_API_KEY"
    request_batch_size: int = 64  # texts per request to an OpenAI-compatible endpoint
    skip_failed: bool = False  # a model that fails to load/encode is reported and skipped
    plots: bool = True
    show_progress: bool = True

    def __post_init__(self):
        if isinstance(self.thresholds, str):
            self.thresholds = metrics.parse_thresholds(self.thresholds)
        self.thresholds = sorted(float(t) for t in self.thresholds)
        if not self.thresholds:
            raise ConfigError("thresholds: none given")
        for name in ("batch_size", "max_length", "n_bootstrap", "request_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "n_bootstrap" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_tokens_per_batch is not None and (not isinstance(self.max_tokens_per_batch, int)
                                                      or self.max_tokens_per_batch < 1):
            raise ConfigError(f"max_tokens_per_batch must be a positive integer, got {self.max_tokens_per_batch!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ConfigError(f"quantization must be 4bit or 8bit, got {self.quantization!r}")
        from hfemb.modeling.packing import parse_padding_free  # here: importing it loads torch

        self.padding_free = parse_padding_free(self.padding_free, "padding_free")


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
        labelled = rec.candidates or [(t, 1) for t in rec.positives] + [(t, 0) for t in rec.negatives]
        qi = q_ids.setdefault(rec.query, len(q_ids))
        for text, label in labelled:
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
    from hfemb.data.formats import read_records

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
    return pairs


def load_pairs(path, settings: EvalSettings) -> EvalPairs:
    result = read_eval_records(path, settings)
    return make_pairs(result.records, settings, path=path, read_result=result)


def split_by_query(records, dev_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split records into (dev, test) by query text, seeded; records of one query stay together, in file order."""
    if not 0 < dev_fraction < 1:
        raise ConfigError(f"dev fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    queries = list(dict.fromkeys(r.query for r in records))
    if len(queries) < 2:
        raise HfembError(f"cannot split {len(queries)} query into dev and test")
    n_dev = min(max(int(round(dev_fraction * len(queries))), 1), len(queries) - 1)
    order = np.random.default_rng(seed).permutation(len(queries))
    dev_queries = {queries[i] for i in order[:n_dev]}
    return [r for r in records if r.query in dev_queries], [r for r in records if r.query not in dev_queries]


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
    """Per model: the threshold to deploy (best F1 on dev, else on eval), eval F1 there, bootstrap intervals."""
    lt, names = settings.label_threshold, list(eval_scores)
    confusions = []
    for name in names:
        res = results[name]
        if dev_pairs is not None:
            res["dev"] = summary_metrics(dev_pairs, dev_scores[name], settings)
            chosen, source_pairs, source_scores = res["dev"]["best_threshold"], dev_pairs, dev_scores[name]
        else:
            chosen, source_pairs, source_scores = res["best_threshold"], eval_pairs, eval_scores[name]
        (row,) = metrics.threshold_sweep(eval_pairs.labels, eval_scores[name], [chosen], label_threshold=lt)
        res.update({"chosen_threshold": chosen, "chosen_on": "dev" if dev_pairs is not None else "eval",
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
    from hfemb.evaluation.report import write_report

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
        try:
            encoded = encode_texts(spec, name, query_texts, doc_texts, settings)
        except HfembError as exc:
            if not settings.skip_failed:
                raise HfembError(f"model {name!r} ({spec}): {exc}") from exc
            failed[name] = str(exc)
            print(f"hfemb eval: skipping model {name!r} ({spec}): {exc}")
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
