"""Models for evaluation: which ones (defaults, the latest training output, ``--model`` specs), loading
them (local or ``openai:MODEL@URL``), and encoding each distinct text once through the embedding cache.
"""

from __future__ import annotations

import gc
import inspect
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hfemb.errors import ConfigError, HfembError
from hfemb.evaluation.cache import EmbeddingCache, default_cache_dir, model_location_fingerprint
from hfemb.evaluation.openai_client import embeddings_url, is_openai_spec, openai_encoder, parse_openai_spec
from hfemb.evaluation.settings import EvalSettings

DEFAULT_BASE_MODELS = {"base 0.6B": "Qwen/Qwen3-Embedding-0.6B", "base 8B": "Qwen/Qwen3-Embedding-8B"}
CACHE_FORMAT = 1  # bump when what a cached vector means changes
CHUNK_TEXTS = 2048  # texts per encode call of an OpenAI-compatible endpoint: progress and cache-write granularity
CACHE_FLUSH_TEXTS = 8192  # a local model's vectors go to the cache (one commit) every this many texts


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
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {device}: no such CUDA device ({torch.cuda.device_count()} available)")
    dtype = settings.dtype
    if dtype == "auto":
        on_gpu = device.startswith("cuda") and torch.cuda.is_available()
        dtype = "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def model_fingerprint(spec: str, settings: EvalSettings) -> dict:
    """What determines a model's vectors (without loading it); keys the embedding cache."""
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
    if is_openai_spec(spec):
        if settings.prompt_name is not None:
            raise ConfigError(f"--prompt-name {settings.prompt_name}: an OpenAI-compatible endpoint has no saved "
                              "prompts; pass the task with --instruction instead")
        return openai_encoder(spec, instruction=settings.instruction, symmetric=settings.symmetric,
                              api_key_env=settings.api_key_env, batch_size=settings.request_batch_size,
                              dimensions=settings.truncate_dim)
    from hfemb.modeling.loading import load_embedding_model  # lazy: torch; OpenAI-compatible endpoints need none

    _, dtype = _resolved_device_dtype(settings)
    model = load_embedding_model(
        resolve_model_path(spec), pooling=settings.pooling, query_instruction=settings.instruction,
        symmetric=settings.symmetric, torch_dtype=dtype, trust_remote_code=settings.trust_remote_code,
        truncate_dim=settings.truncate_dim, device=settings.device, quantization=settings.quantization,
        padding_free=settings.padding_free)
    if settings.prompt_name is not None:  # a saved prompt by name (ConfigError naming the model's prompts)
        model.query_prompt = model.prompt(settings.prompt_name)
        if settings.symmetric:
            model.document_prompt = model.query_prompt
    return model
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


def encode_or_skip(spec: str, name: str, query_texts: list[str], doc_texts: list[str], settings: EvalSettings,
                   failed: dict[str, str]) -> EncodedTexts | None:
    """`encode_texts`, or with ``settings.skip_failed`` None after recording the failure in ``failed`` (a
    failure otherwise stops the run, naming the model)."""
    try:
        return encode_texts(spec, name, query_texts, doc_texts, settings)
    except HfembError as exc:
        if not settings.skip_failed:
            raise HfembError(f"model {name!r} ({spec}): {exc}") from exc
        failed[name] = str(exc)
        print(f"hfemb eval: skipping model {name!r} ({spec}): {exc}")
        return None


def encode_texts(spec: str, name: str, query_texts: list[str], doc_texts: list[str],
                 settings: EvalSettings) -> EncodedTexts:
    """Encode distinct query and document texts once, through the cache; the model loads only if needed."""
    started = time.perf_counter()
    request = {"instruction": settings.instruction, "symmetric": settings.symmetric}
    if settings.prompt_name is not None:  # (only then: earlier caches keep their keys)
        request["prompt_name"] = settings.prompt_name
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
    """[len(texts), D] float32 in input order. A local model (its ``encode`` takes ``on_batch``) gets all the texts
    in one call: tokenised once and batched by token length exactly as ``model.encode(texts)`` batches them (the
    same vectors, bit for bit); its batches drive the progress bar and, every ``CACHE_FLUSH_TEXTS`` texts,
    ``on_chunk`` (the cache, so an interrupted run resumes). Other encoders (OpenAI-compatible endpoints) get chunks of
    ``CHUNK_TEXTS`` texts, longest first."""
    kw = {"is_query": is_query, "batch_size": settings.batch_size, "max_length": settings.max_length,
          "max_tokens_per_batch": settings.max_tokens_per_batch, "show_progress": False}
    if "on_batch" in inspect.signature(encoder.encode).parameters:
        pending: list[int] = []
        pending_vectors: list[np.ndarray] = []

        def flush() -> None:
            if pending:
                on_chunk([texts[i] for i in pending], np.concatenate(pending_vectors))
                pending.clear()
                pending_vectors.clear()

        def on_batch(idx: list[int], vectors) -> None:
            if on_chunk is not None:
                pending.extend(idx)
                pending_vectors.append(np.asarray(vectors, dtype=np.float32))
                if len(pending) >= CACHE_FLUSH_TEXTS:
                    flush()
            progress.update(len(idx))

        vectors = np.asarray(encoder.encode(texts, on_batch=on_batch, **kw), dtype=np.float32)
        if on_chunk is not None:
            flush()
        if vectors.shape[0] != len(texts):
            raise HfembError(f"encoder returned {vectors.shape[0]} vectors for {len(texts)} texts")
        return vectors
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunk = CHUNK_TEXTS
    out = np.empty((len(texts),), dtype=object)
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        vectors = np.asarray(encoder.encode([texts[i] for i in idx], **kw), dtype=np.float32)
        if vectors.shape[0] != len(idx):
            raise HfembError(f"encoder returned {vectors.shape[0]} vectors for {len(idx)} texts")
        for i, v in zip(idx, vectors):
            out[i] = v
        if on_chunk is not None:
            on_chunk([texts[i] for i in idx], vectors)
        progress.update(len(idx))
    return np.stack(list(out))
