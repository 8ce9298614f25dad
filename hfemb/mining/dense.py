"""Model-aware mining: embeddings of queries and documents (evaluation's loading and embedding cache),
blocked dense scores, reciprocal-rank fusion with BM25, the positive-aware false-negative limit, and
teacher similarities for mined rows.

* Embeddings come from `hfemb.evaluation.encoders.encode_texts`: a local folder, a training output, an
  adapter or ``openai:MODEL@URL``, L2-normalised, cached on disk by model fingerprint (a second mining run
  with the same model encodes nothing). Scores are cosine similarities.
* Scores are computed a block of queries at a time (`dense_block`: [batch, docs]), never as a whole
  queries x documents matrix; top-k selection then reads the block as it reads BM25's.
* ``hybrid`` ranks by reciprocal-rank fusion (Cormack et al. 2009): ``1/(k + rank_bm25) + 1/(k + rank_dense)``
  with 1-based ranks within the query's candidates, ``k = 60``.
* The false-negative limit (NV-Retriever's TopK-PercPos / TopK-MarginPos): a candidate whose dense score
  exceeds ``max_relative_score * s(q, positive)`` or ``s(q, positive) - max_score_margin`` is no negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hfemb.errors import ConfigError

SCORERS = ("bm25", "dense", "hybrid")
RRF_K = 60


@dataclass
class EncoderSettings:
    """How mining encodes texts (the evaluation settings it passes on; the rest are evaluation's defaults)."""

    instruction: str | None = None  # None: each model's own query prompt; "": none
    batch_size: int = 32
    max_length: int = 512
    device: str | None = None
    cache_dir: str | None = None  # embedding cache; None: $HFEMB_CACHE/embeddings or ~/.cache/hfemb/embeddings
    use_cache: bool = True
    show_progress: bool = False


def _eval_settings(enc: EncoderSettings):
    from hfemb.evaluation.evaluate import EvalSettings  # lazy: pulls sklearn/torch only when a model is used

    instruction = False if enc.instruction == "" else enc.instruction
    return EvalSettings(instruction=instruction, batch_size=enc.batch_size, max_length=enc.max_length,
                        device=enc.device, cache_dir=enc.cache_dir, use_cache=enc.use_cache,
                        show_progress=enc.show_progress, plots=False)


def embed(spec: str, queries: list[str], documents: list[str], enc: EncoderSettings, name: str = "mining"
          ) -> tuple[np.ndarray, np.ndarray, dict]:
    """([len(queries), D], [len(documents), D], info): float32, L2-normalised, in input order."""
    from hfemb.evaluation.encoders import encode_texts

    queries_u, docs_u = list(dict.fromkeys(queries)), list(dict.fromkeys(documents))
    out = encode_texts(spec, name, queries_u, docs_u, _eval_settings(enc))
    q_pos = {t: i for i, t in enumerate(queries_u)}
    d_pos = {t: i for i, t in enumerate(docs_u)}
    q = out.queries[[q_pos[t] for t in queries]] if queries else np.zeros((0, 0), np.float32)
    d = out.documents[[d_pos[t] for t in documents]] if documents else np.zeros((0, 0), np.float32)
    return q.astype(np.float32, copy=False), d.astype(np.float32, copy=False), out.info


def dense_block(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Cosine scores of a block of queries [b, D] against all documents [N, D] -> [b, N] (float32)."""
    return q @ d.T


def ranks_best_first(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each score (1 = highest); ties share the best rank of their group ("min" ranking)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    first = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    group_rank = np.flatnonzero(first)[np.cumsum(first) - 1] + 1  # rank of each sorted entry's tie group
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = group_rank
    return ranks


def rrf_scores(*score_lists: np.ndarray, k: int = RRF_K) -> np.ndarray:
    """Reciprocal-rank fusion: sum over rankings of 1 / (k + rank), ranks 1-based within the candidates."""
    return sum(1.0 / (k + ranks_best_first(s)) for s in score_lists)


def positive_limit(positive_score: float, max_relative_score: float | None, max_score_margin: float | None
                   ) -> float | None:
    """Highest dense score a negative may have for this positive (None: no limit). The relative limit is
    only applied to a positive scoring > 0 (a fraction of a negative score would be above it)."""
    limits = []
    if max_relative_score is not None and positive_score > 0:
        limits.append(max_relative_score * positive_score)
    if max_score_margin is not None:
        limits.append(positive_score - max_score_margin)
    return min(limits) if limits else None


def check_scorer(scorer: str, model: str | None) -> None:
    if scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if scorer != "bm25" and not model:
        raise ConfigError(f"scorer {scorer!r} needs a model (--model PATH, a training output or openai:MODEL@URL)")
    if scorer == "bm25" and model:
        raise ConfigError("--model is used by --scorer dense or hybrid; with BM25 give --scorer dense|hybrid too")


def add_teacher_scores(rows: list[dict], teacher: str, enc: EncoderSettings) -> dict:
    """Write the teacher's cosine similarity of each row's query to its positive (``pos_scores``, a list of
    one) and to each of its negatives (``neg_scores``), FlagEmbedding's names, in place; and to each of its
    ``negative_candidates`` (``negative_candidate_scores``, same keys and order). Returns timing info."""
    if not rows:
        return {"texts": 0}
    queries = [r["query"] for r in rows]
    docs = list(dict.fromkeys(t for r in rows for t in (r["positive"], *r["negative"],
                                                            *(x for pool in r.get("negative_candidates", {}).values()
                                                              for x in pool))))
    q, d, info = embed(teacher, queries, docs, enc, name="teacher")
    d_pos = {t: i for i, t in enumerate(docs)}

    def scores(i: int, texts: list[str]) -> list[float]:
        return [round(float(s), 6) for s in d[[d_pos[t] for t in texts]] @ q[i]]  # [len(texts)]

    for i, row in enumerate(rows):
        row["pos_scores"] = scores(i, [row["positive"]])
        row["neg_scores"] = scores(i, row["negative"])
        if row.get("negative_candidates"):
            row["negative_candidate_scores"] = {kind: scores(i, pool) for kind, pool in row["negative_candidates"].items()}
    return info
