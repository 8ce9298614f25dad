"""Evaluation of the live model during training, with the code of `run_eval.py`.

An ``EmbeddingEvaluator`` holds one eval set, read once before training: a labelled pool or pair set (records
with graded ``candidates``: the threshold sweep, best F1 and its threshold, ROC-AUC, AP and per-query MRR@10 /
nDCG@10 / Recall@k, ``hfemb.evaluation.evaluate.summary_metrics``) or a retrieval set (a BEIR folder, or
queries with positives and negatives searched over all of the set's documents: nDCG@10, MRR@10, Recall@k,
MAP@100 and the top-10 threshold sweep, ``hfemb.evaluation.retrieval``). Calling it with the model returns
``{metric: value}``; `MultiNegEmbeddingTrainer` logs them as ``eval_<metric>`` (``eval_<name>_<metric>`` for a
named set of ``data.eval_files``), so ``training.metric_for_best_model`` can name any of them.

Distributed: each process encodes a strided shard of the texts and the vectors are gathered once per text
list (``all_gather_object``); every process then computes the same metrics (cheap), so the best-checkpoint
choice agrees everywhere. Under DeepSpeed ZeRO-3 (parameters partitioned: every forward is collective)
every process encodes all texts instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hfemb.data.beir import RetrievalSet, is_beir_folder, read_beir, retrieval_set_from_records
from hfemb.errors import ConfigError
from hfemb.evaluation import retrieval_metrics as rm
from hfemb.evaluation.evaluate import EvalPairs, cosine_scores, pairs_from_records, summary_metrics
from hfemb.evaluation.faiss_search import faiss_search, import_faiss
from hfemb.evaluation.retrieval import TOP_K, exact_search, score_run, summarize_run
from hfemb.evaluation.settings import EvalSettings

POOL_METRICS = ("best_f1", "best_threshold", "roc_auc", "average_precision")
POOL_RANKING_METRICS = ("mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10")
RETRIEVAL_EXTRA = ("best_f1", "best_threshold")
# metrics of the contrastive eval loss pass (MultiNegEmbeddingTrainer.prediction_step)
LOSS_METRICS = ("loss", "accuracy", "positive_similarity", "negative_similarity", "margin")


@dataclass
class EmbeddingEvaluator:
    """One eval set and how to score it; ``name`` None logs ``eval_<metric>``, else ``eval_<name>_<metric>``."""

    kind: str  # "pool" | "retrieval"
    name: str | None
    source: str
    pairs: EvalPairs | None = None
    rset: RetrievalSet | None = None
    label_threshold: int = 1
    batch_size: int = 32
    query_max_len: int = 128
    passage_max_len: int = 512
    max_tokens_per_batch: int | None = 16384
    # several datasets (data.train_files): query text -> its dataset's query prompt (None: the model's own)
    query_prompts: dict[str, str | None] | None = None
    search: str = "exact"  # retrieval sets: "exact" | "faiss" | "faiss-hnsw" (hfemb.evaluation.faiss_search)

    @property
    def prefix(self) -> str:
        return f"{self.name}_" if self.name else ""

    def base_metric_names(self) -> list[str]:
        if self.kind == "retrieval":
            return [*rm.RETRIEVAL_METRICS, *RETRIEVAL_EXTRA]
        grouped = len(self.pairs.labels) > len(self.pairs.queries)  # some query has several candidates
        return [*POOL_METRICS, *(POOL_RANKING_METRICS if grouped else ())]

    def metric_names(self) -> list[str]:
        """Names (without ``eval_``) this evaluator returns."""
        return [self.prefix + n for n in self.base_metric_names()]

    def describe(self) -> dict:
        """What the evaluator holds, for ``train_summary.json``."""
        size = ({"queries": len(self.rset.query_ids), "documents": len(self.rset.doc_ids)} if self.kind == "retrieval"
                else {"queries": len(self.pairs.queries), "pairs": int(len(self.pairs.labels))})
        return {"name": self.name, "kind": self.kind, "source": self.source, **size,
                "metrics": [f"eval_{n}" for n in self.metric_names()]}

    def texts(self) -> tuple[list[str], list[str]]:
        if self.kind == "retrieval":
            return self.rset.query_texts, list(dict.fromkeys(self.rset.doc_texts))
        return self.pairs.queries, self.pairs.documents

    def __call__(self, model, sharded: bool = True) -> dict[str, float]:
        """``sharded`` False: this process encodes every text itself (e.g. the main process alone, after training)."""
        queries, documents = self.texts()
        prompts = [self.query_prompts.get(t) for t in queries] if self.query_prompts else None
        q = encode_sharded(model, queries, is_query=True, batch_size=self.batch_size, max_length=self.query_max_len,
                           max_tokens_per_batch=self.max_tokens_per_batch, prompts=prompts, sharded=sharded)
        d = encode_sharded(model, documents, is_query=False, batch_size=self.batch_size,
                           max_length=self.passage_max_len, max_tokens_per_batch=self.max_tokens_per_batch,
                           sharded=sharded)
        return self.score(q, d, device=model.device)

    def score(self, q: np.ndarray, d: np.ndarray, device=None) -> dict[str, float]:
        """Metrics from the encoded queries and (distinct) documents of ``texts()``."""
        settings = EvalSettings(label_threshold=self.label_threshold, n_bootstrap=0, show_progress=False)
        if self.kind == "retrieval":
            pos = {t: i for i, t in enumerate(dict.fromkeys(self.rset.doc_texts))}
            corpus = d[[pos[t] for t in self.rset.doc_texts]]
            if self.search == "exact":
                scores, ranked = exact_search(q, corpus, TOP_K, device=device)
            else:
                scores, ranked = faiss_search(q, corpus, TOP_K, kind=self.search)
            summary = summarize_run(score_run(scores, ranked, self.rset, label_threshold=self.label_threshold),
                                    settings.thresholds)
        else:
            summary = summary_metrics(self.pairs, cosine_scores(self.pairs, q, d), settings)
            summary.update(summary.pop("ranking") or {})
        return {self.prefix + k: float(summary[k]) for k in self.base_metric_names()}


def encode_sharded(model, texts: list[str], *, is_query: bool, prompts: list[str | None] | None = None,
                   sharded: bool = True, **kwargs) -> np.ndarray:
    """``model.encode`` of ``texts`` [N] -> [N, D] float32; with several processes (and ``sharded``) each encodes
    ``texts[r::W]`` and the shards are gathered once (every process gets all rows, in order). ``prompts``: one
    per text (None: the model's own)."""
    if prompts is not None:
        kwargs["prompts"] = prompts
    from hfemb.training.distributed import is_distributed, rank, world_size

    if not texts:
        return np.zeros((0, model.embedding_dim), dtype=np.float32)
    if not sharded or not is_distributed() or _zero3():
        return np.asarray(model.encode(texts, is_query=is_query, **kwargs), dtype=np.float32)
    import torch.distributed as dist

    w, r = world_size(), rank()
    if prompts is not None:
        kwargs["prompts"] = prompts[r::w]
    mine = np.asarray(model.encode(texts[r::w], is_query=is_query, **kwargs), dtype=np.float32) if texts[r::w] \
        else np.zeros((0, model.embedding_dim), dtype=np.float32)
    parts: list = [None] * w
    dist.all_gather_object(parts, mine)
    out = np.empty((len(texts), parts[0].shape[1] if len(parts[0]) else model.embedding_dim), dtype=np.float32)
    for i, part in enumerate(parts):
        out[i::w] = part
    return out


def _zero3() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def evaluator_from_file(path: str, *, name: str | None, data_config, settings_kw: dict | None = None) -> EmbeddingEvaluator:
    """A BEIR folder (qrels/dev.tsv when it exists, else test.tsv) or a records file (any format
    ``hfemb.data.formats.read_records`` reads): graded candidates make a pool set, else a retrieval set over the
    file's own documents."""
    from hfemb.data.formats import read_records

    common = {"name": name, "source": str(path), "label_threshold": data_config.label_threshold,
              "query_max_len": data_config.query_max_len, "passage_max_len": data_config.passage_max_len,
              "search": getattr(data_config, "eval_search", "exact"), **(settings_kw or {})}
    if is_beir_folder(path):
        from pathlib import Path

        split = "dev" if (Path(path) / "qrels" / "dev.tsv").is_file() else "test"
        return EmbeddingEvaluator("retrieval", rset=read_beir(path, split), **common)
    result = read_records(path, fmt=data_config.format, on_error="skip" if data_config.skip_bad_rows else "raise",
                          label_threshold=data_config.label_threshold)
    return evaluator_from_records(result.records, **common)


def evaluator_from_records(records, **common) -> EmbeddingEvaluator:
    if any(r.candidates for r in records):
        pairs = pairs_from_records(records, label_threshold=common.get("label_threshold", 1))
        if not (pairs.labels >= common.get("label_threshold", 1)).any():
            raise ConfigError(f"{common.get('source')}: no relevant pair (label >= {common.get('label_threshold', 1)})")
        return EmbeddingEvaluator("pool", pairs=pairs, **common)
    return EmbeddingEvaluator("retrieval", rset=retrieval_set_from_records(records, None, path=common.get("source", "")),
                              **common)


def records_from_rows(rows: list[dict]):
    """Training rows ``{"query","positive","negatives"}`` (e.g. the eval_ratio hold-out) as records."""
    from hfemb.data.formats import Record

    by_query: dict[str, Record] = {}
    for row in rows:
        rec = by_query.setdefault(row["query"], Record(row["query"], []))
        if row["positive"] not in rec.positives:
            rec.positives.append(row["positive"])
        rec.negatives.extend(n for n in row["negatives"] if n not in rec.negatives)
    return list(by_query.values())


def run_evaluators(evaluators: list[EmbeddingEvaluator], model, prefix: str = "eval") -> dict[str, float]:
    """All evaluators on ``model``: ``{f"{prefix}_{metric}": value}`` plus the seconds they took."""
    started = time.perf_counter()
    out: dict[str, float] = {}
    for ev in evaluators:
        out.update({f"{prefix}_{k}": v for k, v in ev(model).items()})
    out[f"{prefix}_embedding_runtime"] = round(time.perf_counter() - started, 3)
    return out


def available_metrics(evaluators: list[EmbeddingEvaluator], with_loss: bool) -> list[str]:
    """Every ``eval_*`` name an evaluation will log (for checking ``metric_for_best_model`` before training)."""
    names = [f"eval_{m}" for m in LOSS_METRICS] if with_loss else []
    return names + [f"eval_{n}" for ev in evaluators for n in ev.metric_names()]


def build_evaluators(cfg, eval_rows: list[dict]) -> list[EmbeddingEvaluator]:
    """The training run's evaluators: ``data.eval_file`` (or the ``eval_ratio`` hold-out rows, each query with its
    dataset's prompt under ``data.train_files``) unnamed, and each ``data.eval_files`` entry by name. None when
    ``data.embedding_eval`` is false (named sets still run)."""
    d = cfg.data
    batch = {"batch_size": int(cfg.training.get("per_device_eval_batch_size") or 32)}
    out = []
    if d.embedding_eval:
        if d.eval_file:
            out.append(evaluator_from_file(d.eval_file, name=None, data_config=d, settings_kw=batch))
        elif eval_rows:
            out.append(evaluator_from_records(
                records_from_rows(eval_rows), name=None, source=f"eval_ratio {d.eval_ratio:g} hold-out",
                label_threshold=d.label_threshold, query_max_len=d.query_max_len, passage_max_len=d.passage_max_len,
                query_prompts={r["query"]: r["query_prompt"] for r in eval_rows} if "query_prompt" in eval_rows[0]
                else None, search=d.eval_search, **batch))
    for name, path in (d.eval_files or {}).items():
        out.append(evaluator_from_file(path, name=name, data_config=d, settings_kw=batch))
    if d.eval_search != "exact" and any(ev.kind == "retrieval" for ev in out):
        import_faiss()  # not installed: one clear error before training
    return out


def check_best_metric(cfg, evaluators: list[EmbeddingEvaluator], with_loss: bool) -> None:
    """``training.metric_for_best_model`` must name a metric the evaluation logs (one clear error before
    training, not a KeyError at the first evaluation). Without an eval loss set it defaults to the main
    evaluator's nDCG@10 (retrieval) or best F1 (pool)."""
    t = cfg.training
    if not evaluators and not with_loss:
        return
    metric = t.get("metric_for_best_model")
    if metric is None:
        if not with_loss:
            main = next((ev for ev in evaluators if ev.name is None), evaluators[0])
            t["metric_for_best_model"] = "eval_" + main.prefix + ("ndcg@10" if main.kind == "retrieval" else "best_f1")
        return
    name = metric if metric.startswith("eval_") else f"eval_{metric}"
    known = available_metrics(evaluators, with_loss)
    if name not in known:
        raise ConfigError(f"{cfg.source or 'config'}: 'training.metric_for_best_model' is {metric!r}, which the "
                          f"evaluation does not log; it logs {', '.join(known)}")
