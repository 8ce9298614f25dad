"""Threshold-sweep evaluation of several embedding models on labelled (query, document) pairs.

``evaluate({"base": "Qwen/Qwen3-Embedding-0.6B", "tuned": "output/run/merged"}, "test.jsonl", dev_path="dev.jsonl")``
reads the pairs (any eval format ``hfemb.data.read_records`` knows), encodes each distinct text once per
model (queries and documents apart, since their prompts differ; an on-disk cache makes re-runs free),
scores pairs by cosine similarity, and reports per model: precision/recall/F1/accuracy at each threshold
(``score >= threshold`` is positive), best F1 over all thresholds (sklearn's PR curve), ROC-AUC, AP,
MRR@10/nDCG@10/Recall@k per query, the threshold to deploy (best F1 on ``dev`` when given, else on the
eval set itself: optimistic) with bootstrap intervals. Files are written by ``hfemb.eval_report``.
"""

from __future__ import annotations

import gc
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hfemb import metrics
from hfemb.errors import ConfigError, HfembError

DEFAULT_BASE_MODELS = {"base 0.6B": "Qwen/Qwen3-Embedding-0.6B", "base 8B": "Qwen/Qwen3-Embedding-8B"}
CACHE_FORMAT = 1  # bump when what a cached vector means changes
CHUNK_TEXTS = 2048  # texts per encode call: progress and cache-write granularity


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
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ConfigError(f"quantization must be 4bit or 8bit, got {self.quantization!r}")


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
    from hfemb.data import read_records

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


# ------------------------------------------------------------------------------------------ models
def latest_training_output(root: str | Path) -> Path | None:
    """The most recently modified ``merged/`` under ``root`` (``root/merged``, ``root/*/merged``, ``root/*/*/merged``)."""
    root = Path(root)
    found = [p for pattern in ("merged", "*/merged", "*/*/merged") for p in root.glob(pattern) if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def resolve_model_path(spec: str) -> str:
    """A training output folder (with ``merged/`` or only ``adapter/``) -> the model folder inside it."""
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        for sub in ("merged", "adapter"):
            if (path / sub).is_dir():
                return str(path / sub)
    return spec


def _size_label(name: str) -> str | None:
    match = re.search(r"(\d+(?:\.\d+)?)[Bb]\b", name)
    return f"{match.group(1)}B" if match else None


def default_models(train_output_root: str | Path = "output") -> dict[str, str]:
    """Base Qwen3-Embedding 0.6B and 8B, and the latest training output (named after its base size)."""
    models = dict(DEFAULT_BASE_MODELS)
    run = latest_training_output(train_output_root)
    if run is not None:
        size = None
        try:
            summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
            size = _size_label(str(summary.get("config", {}).get("model", {}).get("name_or_path", "")))
        except (OSError, ValueError, AttributeError):
            pass
        models[f"tuned {size}" if size else "tuned"] = str(run / "merged")
    return models


def parse_model_args(values: list[str]) -> dict[str, str]:
    """``["tuned=output/run", "Qwen/Qwen3-Embedding-0.6B"]`` -> {name: spec}; a bare spec is named by itself."""
    models: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or value.startswith("openai:"):
            name, spec = "", value
        name, spec = name.strip(), spec.strip()
        if not spec:
            raise ConfigError(f"--model {value!r}: expected NAME=PATH_OR_ID (or just PATH_OR_ID)")
        name = name or (Path(spec).name if Path(spec).exists() else spec)
        if name in models:
            raise ConfigError(f"--model {value!r}: the name {name!r} is used twice")
        models[name] = spec
    return models


def _resolved_device_dtype(settings: EvalSettings) -> tuple[str, str]:
    import torch

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype
    if dtype == "auto":
        on_gpu = device.startswith("cuda") and torch.cuda.is_available()
        dtype = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def model_fingerprint(spec: str, settings: EvalSettings) -> dict:
    """What determines a model's vectors (without loading it); keys the embedding cache."""
    from hfemb.eval_cache import model_location_fingerprint
    from hfemb.openai_client import embeddings_url, is_openai_spec, parse_openai_spec

    if is_openai_spec(spec):
        model, url = parse_openai_spec(spec)
        return {"cache_format": CACHE_FORMAT, "openai": model, "url": embeddings_url(url),
                "dimensions": settings.truncate_dim}
    device, dtype = _resolved_device_dtype(settings)
    return {"cache_format": CACHE_FORMAT, "location": model_location_fingerprint(resolve_model_path(spec)),
            "dtype": dtype, "device": device.split(":")[0], "pooling": settings.pooling,
            "truncate_dim": settings.truncate_dim, "max_length": settings.max_length,
            "quantization": settings.quantization}


def load_encoder(spec: str, settings: EvalSettings):
    """A local ``EmbeddingModel`` or an ``OpenAIEncoder``: both have ``encode(texts, is_query=...)`` and prompts."""
    from hfemb.openai_client import is_openai_spec, openai_encoder

    if is_openai_spec(spec):
        return openai_encoder(spec, instruction=settings.instruction, symmetric=settings.symmetric,
                              api_key_env=settings.api_key_env, batch_size=settings.request_batch_size,
                              dimensions=settings.truncate_dim)
    from hfemb.modeling import load_embedding_model

    _, dtype = _resolved_device_dtype(settings)
    return load_embedding_model(
        resolve_model_path(spec), pooling=settings.pooling, query_instruction=settings.instruction,
        symmetric=settings.symmetric, torch_dtype=dtype, trust_remote_code=settings.trust_remote_code,
        truncate_dim=settings.truncate_dim, device=settings.device, quantization=settings.quantization)
    # settings.max_length goes to encode(), which caps it at the model's own limit (MiniLM: 256)


def release_memory() -> None:
    """After the caller dropped its last reference to a model: collect, and give CUDA memory back."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


@dataclass
class EncodedTexts:
    queries: np.ndarray  # [len(query_texts), D] float32, L2-normalised
    documents: np.ndarray  # [len(doc_texts), D]
    info: dict  # prompts, dimension, counts and seconds


def encode_texts(spec: str, name: str, query_texts: list[str], doc_texts: list[str],
                 settings: EvalSettings) -> EncodedTexts:
    """Encode distinct query and document texts once, through the cache; the model loads only if needed."""
    from hfemb.eval_cache import EmbeddingCache, default_cache_dir

    started = time.perf_counter()
    request = {"instruction": settings.instruction, "symmetric": settings.symmetric}
    cache = EmbeddingCache(settings.cache_dir or default_cache_dir(), model_fingerprint(spec, settings)) \
        if settings.use_cache else None
    encoder, load_seconds, encode_seconds, n_encoded = None, 0.0, 0.0, 0
    try:
        prompts = cache.get_prompts(request) if cache else None
        found: dict[str, dict[str, np.ndarray]] = {}
        while True:
            if prompts is not None:
                jobs: dict[str, list[str]] = {}
                for prompt, texts in ((prompts["query"], query_texts), (prompts["document"], doc_texts)):
                    jobs.setdefault(prompt, [])
                    jobs[prompt] = list(dict.fromkeys(jobs[prompt] + texts))
                found = {p: cache.get(p, texts) if cache else {} for p, texts in jobs.items()}
                missing = {p: [t for t in texts if t not in found[p]] for p, texts in jobs.items()}
                if encoder is not None or not any(missing.values()):
                    break
            t0 = time.perf_counter()
            encoder = load_encoder(spec, settings)
            load_seconds = time.perf_counter() - t0
            prompts = {"query": encoder.query_prompt, "document": encoder.document_prompt}
            if cache:
                cache.put_prompts(request, prompts)
        n_missing = sum(len(v) for v in missing.values())
        if n_missing:
            t0 = time.perf_counter()
            progress = _progress(n_missing, name, settings.show_progress)
            for prompt, texts in missing.items():
                if texts:  # each chunk goes to the cache at once: an interrupted run resumes where it stopped
                    save = (lambda chunk, vecs, p=prompt: cache.put(p, chunk, vecs)) if cache else None
                    vectors = _encode_in_chunks(encoder, texts, prompt == prompts["query"], settings, progress, save)
                    found[prompt].update(zip(texts, vectors))
            progress.close()
            encode_seconds = time.perf_counter() - t0
            n_encoded = n_missing
    finally:
        if cache:
            cache.close()
        if encoder is not None:
            encoder = None  # the only reference: the model is freed before the next one loads
            release_memory()
    q = np.stack([found[prompts["query"]][t] for t in query_texts]) if query_texts else np.zeros((0, 0), np.float32)
    d = np.stack([found[prompts["document"]][t] for t in doc_texts]) if doc_texts else np.zeros((0, 0), np.float32)
    n_jobs = sum(len(texts) for texts in jobs.values())  # distinct (prompt, text) encodings needed
    info = {"query_prompt": prompts["query"], "document_prompt": prompts["document"],
            "embedding_dim": int(q.shape[1]) if q.size else None, "texts": n_jobs,
            "texts_encoded": n_encoded, "texts_from_cache": n_jobs - n_encoded,
            "load_seconds": round(load_seconds, 3), "encode_seconds": round(encode_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3)}
    return EncodedTexts(q, d, info)


def _progress(total: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"encoding {name}", unit="text", disable=not enabled, dynamic_ncols=True)


def _encode_in_chunks(encoder, texts: list[str], is_query: bool, settings: EvalSettings, progress,
                      on_chunk=None) -> np.ndarray:
    """Longest texts first, in chunks (progress + cache granularity); the model batches each chunk by tokens."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunk = CHUNK_TEXTS
    out = np.empty((len(texts),), dtype=object)
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        vectors = encoder.encode([texts[i] for i in idx], is_query=is_query, batch_size=settings.batch_size,
                                 max_length=settings.max_length, max_tokens_per_batch=settings.max_tokens_per_batch,
                                 show_progress=False)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[0] != len(idx):
            raise HfembError(f"encoder returned {vectors.shape[0]} vectors for {len(idx)} texts")
        for i, v in zip(idx, vectors):
            out[i] = v
        if on_chunk is not None:
            on_chunk([texts[i] for i in idx], vectors)
        progress.update(len(idx))
    return np.stack(list(out))


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
    from hfemb.eval_report import write_report

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
