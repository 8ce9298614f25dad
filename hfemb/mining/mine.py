"""BM25 hard/easy negative mining.

Each query's irrelevant candidates are ranked by BM25 (:mod:`hfemb.mining.bm25`); every (query, positive) pair
becomes one row with ``num_negatives`` negatives: ``num_hard`` sampled from the ``hard_top_k`` best-ranked
(after skipping ``skip_top`` ranks) and the rest from the ``easy_bottom_k`` worst-ranked, topping up with
more hard ones, then with random irrelevant ones, when a pool runs short (:func:`select_negatives`).

* ``pool`` mode ranks each query's own labelled negatives (``Record.negatives``, derived from a
  labelled pool). By default (``idf_scope="all"``) idf and average length come from all documents of all
  pools together: a pool of ~10 documents is too small for a meaningful idf. ``idf_scope="pool"`` ranks each
  query with the statistics of its own pool only (its positives and negatives), exactly as the reference
  recipe does (one ``rank_bm25.BM25Okapi`` per query), to reproduce it.
* ``corpus`` mode ranks a corpus (default: every positive of the dataset; deduplicated). Excluded for
  each query: its own positives, their exact or normalised (:func:`normalize_text`) duplicates, positives
  of other records with the same normalised query, and documents equal to the query itself.

Sharding splits the queries into ``num_shards`` contiguous blocks (shard i gets queries
``[i*n//k, (i+1)*n//k)``); BM25 statistics always come from the whole input and each query's random
generator is seeded with ``(seed, query index)``, so a row is the same whether mined in a shard or in
one run, and :func:`merge_shards` restores the original order by concatenating shards in index order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hfemb.data.records import Record
from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import read_json, write_json, write_jsonl
from hfemb.mining.bm25 import BM25, IDF_KINDS, TokenizeStats, check_tokenizer, tokenize
from hfemb.mining.dense import (EncoderSettings, add_teacher_scores, check_scorer, dense_block, embed,
                                positive_limit, rrf_scores)

MODES = ("pool", "corpus")
IDF_SCOPES = ("all", "pool")
DROP_REASONS = ("too_few_negatives", "max_relative_score")
_SCORE_BLOCK = 4_000_000  # floats per dense (batch x docs) score block, ~32 MB


@dataclass
class MiningConfig:
    mode: str = "corpus"  # "pool" | "corpus"
    tokenizer: str = "jieba"
    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25
    idf: str = "okapi"  # or "lucene" (never zero or negative; see hfemb.mining.bm25.BM25)
    idf_scope: str = "all"  # pool mode: "all" pools' statistics together, or each query's own "pool"
    hard_top_k: int = 10
    easy_bottom_k: int = 10
    num_negatives: int = 3
    num_hard: int = 1  # 1 hard + 2 easy by default
    skip_top: int = 0
    max_relative_score: float | None = None  # drop candidates scoring above this fraction of the positive's
    # own BM25 (likely false negatives); not applied to a positive scoring <= 0 (BM25 knows nothing then)
    seed: int = 42
    num_shards: int = 1
    shard_index: int = 0
    cache_dir: str | None = None  # token cache; None: $HFEMB_CACHE/tokens or ~/.cache/hfemb/tokens
    workers: int | None = None  # jieba processes for large inputs; None: CPU count
    use_cache: bool = True
    # Model-aware mining (hfemb.mining.dense): rank by "bm25" (default), "dense" (the embedding model `model`)
    # or "hybrid" (reciprocal-rank fusion of both); with a model, max_relative_score and max_score_margin
    # apply to its scores. `teacher`: write the teacher's similarities (pos_scores / neg_scores) to every row.
    scorer: str = "bm25"
    model: str | None = None
    teacher: str | None = None
    max_score_margin: float | None = None  # dense: drop candidates scoring above s(q, positive) - margin
    instruction: str | None = None  # query instruction of the model and teacher (None: each model's own)
    embed_batch_size: int = 32
    device: str | None = None
    embedding_cache_dir: str | None = None  # None: evaluation's cache ($HFEMB_CACHE/embeddings)
    candidates: bool = True  # write each row's hard and easy pools ("negative_candidates"; training redraws
    # that row's negatives from them every epoch after the first)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_tokenizer(self.tokenizer)
        if self.idf not in IDF_KINDS:
            raise ConfigError(f"idf must be one of {', '.join(IDF_KINDS)}, got {self.idf!r}")
        if self.idf_scope not in IDF_SCOPES:
            raise ConfigError(f"idf_scope must be one of {', '.join(IDF_SCOPES)}, got {self.idf_scope!r}")
        for name in ("hard_top_k", "easy_bottom_k", "num_hard", "skip_top", "seed", "shard_index"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.num_hard > self.num_negatives:
            raise ConfigError(f"num_hard ({self.num_hard}) exceeds num_negatives ({self.num_negatives})")
        if self.max_relative_score is not None and not self.max_relative_score > 0:
            raise ConfigError(f"max_relative_score must be > 0, got {self.max_relative_score}")
        if self.num_hard > self.hard_top_k:
            raise ConfigError(f"num_hard ({self.num_hard}) exceeds hard_top_k ({self.hard_top_k}): the hard pool "
                              "is the top hard_top_k candidates")
        if not self.k1 >= 0 or not 0 <= self.b <= 1 or not self.epsilon >= 0:
            raise ConfigError(f"BM25 needs k1 >= 0, 0 <= b <= 1 and epsilon >= 0; got k1={self.k1}, b={self.b}, "
                              f"epsilon={self.epsilon}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        check_scorer(self.scorer, self.model)
        if self.max_score_margin is not None and self.scorer == "bm25":
            raise ConfigError("max_score_margin applies to a model's scores: use it with scorer dense or hybrid")
        if self.embed_batch_size < 1:
            raise ConfigError(f"embed_batch_size must be >= 1, got {self.embed_batch_size}")
        if self.num_shards < 1 or self.shard_index >= self.num_shards:
            raise ConfigError(f"shard_index must be in [0, num_shards), got {self.shard_index}/{self.num_shards}")


@dataclass
class MiningResult:
    rows: list[dict]
    report: dict


@dataclass
class Selection:
    """Negatives chosen from one ranked list (``ids`` are elements of it), or why there are none."""

    ids: list = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "hard" | "easy" | "random", one per id
    score_filtered: int = 0  # candidates dropped by max_score (beyond the skipped ranks)
    drop_reason: str | None = None  # one of DROP_REASONS when the row cannot be filled
    pools: dict = field(default_factory=dict)  # "hard" / "easy" -> the whole pool drawn from (elements of the
    # ranked list, rank order), for each kind drawn from a pool larger than its draw: training redraws from it


_NOT_ALNUM = re.compile(r"[\W_]+")  # \w is str.isalnum() plus "_"


def normalize_text(text: str) -> str:
    """NFKC, case-folded, letters and digits only: finds answers that differ by spaces or punctuation."""
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", text).casefold())


def select_negatives(ranked_ids: Sequence, ranked_scores: Sequence[float], rng: np.random.Generator, *,
                     num_negatives: int, num_hard: int, hard_top_k: int, easy_bottom_k: int,
                     skip_top: int = 0, max_score: float | None = None) -> Selection:
    """Choose negatives from irrelevant candidates ranked best first.

    Candidates scoring above ``max_score`` (likely false negatives; they form a prefix of the ranking) and
    the first ``skip_top`` ranks are never used. Hard pool: the next ``hard_top_k``; easy pool: the last
    ``easy_bottom_k`` of the rest (so the pools never overlap); the middle is the random pool. Takes
    ``num_hard`` hard + the rest easy; short of easy ones, more hard ones, then random ones. Only the
    ranking of the first ``max(skip_top, #above max_score) + hard_top_k`` and last ``easy_bottom_k``
    entries matters. Each pool is sampled without replacement and kept in rank order.
    """
    scores = np.asarray(ranked_scores)  # no copy of a long ranking; compared in float64 below
    n = len(scores)
    n_over = int(np.count_nonzero(scores.astype(np.float64) > max_score)) if max_score is not None else 0
    cut = min(n, max(skip_top, n_over))
    hard = np.arange(cut, min(n, cut + hard_top_k))
    rest = cut + len(hard)
    easy = np.arange(max(rest, n - easy_bottom_k), n)
    middle = range(rest, n - len(easy))  # materialised only when random negatives are drawn
    n_hard = min(num_hard, len(hard))
    n_easy = min(num_negatives - n_hard, len(easy))
    n_hard += min(num_negatives - n_hard - n_easy, len(hard) - n_hard)
    n_random = num_negatives - n_hard - n_easy
    selection = Selection(score_filtered=max(0, min(n, n_over) - skip_top))
    if n_random > len(middle):
        short_anyway = n - min(n, skip_top) < num_negatives
        selection.drop_reason = "too_few_negatives" if short_anyway else "max_relative_score"
        return selection
    for kind, pool, k in (("hard", hard, n_hard), ("easy", easy, n_easy), ("random", middle, n_random)):
        if k and kind != "random" and len(pool) > k:
            selection.pools[kind] = [ranked_ids[pos] for pos in pool]
        picked = np.sort(rng.choice(len(pool), size=k, replace=False)) if k else []
        for pos in (np.asarray(pool)[picked] if k else ()):
            selection.ids.append(ranked_ids[pos])
            selection.scores.append(float(scores[pos]))
            selection.kinds.append(kind)
    return selection


def rank_candidates(scores: np.ndarray, rng: np.random.Generator, head: int | None = None, tail: int = 0
                    ) -> np.ndarray:
    """Order of ``scores`` best first, ties in random order; positions into ``scores``.

    With ``head``, only the first ``head`` and last ``tail`` positions are ranked (the middle is left in
    index order), in O(n) without copies of ``scores`` beyond one partition each: this is what
    :func:`select_negatives` reads, on corpora of any size.
    """
    n = len(scores)
    if head is None or head + tail >= n:
        return np.lexsort((rng.random(n), -scores))
    head_ids = _extreme(scores, head, rng, best=True)
    # head + tail < n: the rest holds >= tail values, none above a head value, so its `tail` lowest values
    # are the `tail` lowest of all; only ties at that boundary may include head positions.
    tail_ids = _extreme(scores, tail, rng, best=False, exclude=head_ids)
    remaining = np.ones(n, dtype=bool)
    remaining[head_ids] = False
    remaining[tail_ids] = False
    return np.concatenate([head_ids, np.flatnonzero(remaining), tail_ids])


def _extreme(scores: np.ndarray, k: int, rng: np.random.Generator, best: bool,
             exclude: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``k`` best (or worst) scores, outside ``exclude``; ties at the boundary chosen at
    random (in index order, then ``rng``); sorted best first."""
    if k <= 0:
        return np.zeros(0, dtype=np.intp)
    n = len(scores)
    extreme = scores.max() if best else scores.min()
    if np.count_nonzero(scores == extreme) >= k:  # e.g. the many zero scores at the bottom of a big corpus
        boundary = extreme  # (a partition is slow on heavy ties)
    else:
        boundary = np.partition(scores, n - k)[n - k] if best else np.partition(scores, k - 1)[k - 1]
    inside = np.flatnonzero(scores > boundary) if best else np.flatnonzero(scores < boundary)
    tied = np.flatnonzero(scores == boundary)
    if exclude is not None and len(exclude):
        tied = tied[~np.isin(tied, exclude)]
    need = k - len(inside)  # a random `need` of the ties (O(need), not a shuffle of all of them)
    chosen = np.concatenate([inside, tied[np.sort(rng.choice(len(tied), size=need, replace=False))]])
    return chosen[np.lexsort((rng.random(len(chosen)), -scores[chosen]))]


def pool_scores(record: Record, query_tokens: list[str], doc_index: dict[str, int], doc_tokens: list[list[str]],
                config: MiningConfig) -> dict[int, float]:
    """BM25 of the query against its own pool (positives and negatives, deduplicated), with that pool's idf and
    average length -- ``rank_bm25.BM25Okapi(pool).get_scores(query)``; keyed by global document id."""
    ids = [doc_index[t] for t in dict.fromkeys((*record.positives, *record.negatives))]
    local = BM25([doc_tokens[i] for i in ids], k1=config.k1, b=config.b, epsilon=config.epsilon,
                 idf_kind=config.idf).get_scores(query_tokens)
    return {i: float(s) for i, s in zip(ids, local)}


def shard_bounds(n: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Query range ``[start, end)`` of one contiguous shard."""
    return n * shard_index // num_shards, n * (shard_index + 1) // num_shards


def records_fingerprint(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.query, r.positives, r.negatives], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def _tokenize_timed(texts: list[str], config: MiningConfig, totals: dict) -> list[list[str]]:
    stats = TokenizeStats()
    tokens = tokenize(texts, config.tokenizer, cache_dir=config.cache_dir, use_cache=config.use_cache,
                      workers=config.workers, stats=stats)
    totals["texts"] += stats.texts
    totals["seconds"] += stats.seconds
    totals["cache_hits" if stats.cache_hit else "cache_misses"] += 1
    totals["workers"] = max(totals["workers"], stats.workers)
    return tokens


def mine(records: list[Record], config: MiningConfig, corpus: list[str] | None = None) -> MiningResult:
    """Mine negatives for the shard ``config.shard_index`` of ``records`` (see the module docstring)."""
    start_time = time.perf_counter()
    if config.mode == "pool" and corpus is not None:
        raise ConfigError("a corpus is only used in corpus mode")
    if config.idf_scope == "pool" and config.mode != "pool":
        raise ConfigError("idf_scope 'pool' (each query's own pool statistics) needs pool mode")
    q_start, q_end = shard_bounds(len(records), config.num_shards, config.shard_index)
    tok = {"texts": 0, "seconds": 0.0, "cache_hits": 0, "cache_misses": 0, "workers": 1}
    if config.mode == "pool":
        if not any(r.negatives for r in records):
            raise ConfigError("pool mode needs records with labelled candidates (or negatives); use corpus mode")
        doc_texts = list(dict.fromkeys(t for r in records for t in (*r.positives, *r.negatives)))
    else:
        texts = corpus if corpus is not None else (p for r in records for p in r.positives)
        doc_texts = list(dict.fromkeys(texts))  # exact duplicates would be the same negative twice
        if not doc_texts:
            raise ConfigError("corpus mode needs a non-empty corpus (or records with positives)")
    doc_tokens = _tokenize_timed(doc_texts, config, tok)
    shard = records[q_start:q_end]
    query_tokens = _tokenize_timed([r.query for r in shard], config, tok)
    doc_index = {t: i for i, t in reversed(list(enumerate(doc_texts)))}  # first occurrence wins
    outside = list(dict.fromkeys(p for r in shard for p in r.positives if p not in doc_index))
    outside_tokens = dict(zip(outside, _tokenize_timed(outside, config, tok))) if outside else {}

    t0 = time.perf_counter()
    index = BM25(doc_tokens, k1=config.k1, b=config.b, epsilon=config.epsilon, idf_kind=config.idf)
    build_seconds = time.perf_counter() - t0
    norm = _Normalizer()
    norm_docs: dict[str, list[int]] = {}
    for i, text in enumerate(doc_texts):
        norm_docs.setdefault(norm(text), []).append(i)
    same_query: dict[str, list[str]] = {}  # normalised query -> positives of every record asking it
    if config.mode == "corpus":
        for r in records:
            same_query.setdefault(norm(r.query), []).extend(r.positives)

    encoder_settings = EncoderSettings(instruction=config.instruction, batch_size=config.embed_batch_size,
                                       device=config.device, cache_dir=config.embedding_cache_dir,
                                       use_cache=config.use_cache)
    q_emb = d_emb = None
    embedding_info: dict = {}
    if config.scorer != "bm25":
        t0 = time.perf_counter()
        q_emb, all_emb, embedding_info = embed(config.model, [r.query for r in shard], doc_texts + outside,
                                               encoder_settings)
        d_emb, outside_emb = all_emb[:len(doc_texts)], dict(zip(outside, all_emb[len(doc_texts):]))
        embedding_info["seconds"] = round(time.perf_counter() - t0, 3)

    rows: list[dict] = []
    dropped, kinds, excluded = Counter(), Counter(), Counter()
    score_filtered = queries_without_positive = 0
    scoring_seconds = selection_seconds = 0.0
    batch = max(1, min(256, _SCORE_BLOCK // index.num_docs))
    for b_start in range(0, len(shard), batch):
        t0 = time.perf_counter()
        block = index.score_batch(query_tokens[b_start:b_start + batch])  # (batch x docs)
        dblock = dense_block(q_emb[b_start:b_start + batch], d_emb) if q_emb is not None else None  # (batch x docs)
        scoring_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        for j, record in enumerate(shard[b_start:b_start + batch]):
            qi = q_start + b_start + j
            positives = list(dict.fromkeys(record.positives))
            if not positives:
                queries_without_positive += 1
                continue
            rng = np.random.default_rng([config.seed, qi])
            ids = _candidate_ids(record, config.mode, index.num_docs, doc_index, doc_texts, norm, norm_docs,
                                 same_query, excluded)
            if config.idf_scope == "pool":  # BM25 over this query's own pool only (the reference recipe)
                own = pool_scores(record, query_tokens[b_start + j], doc_index, doc_tokens, config)
                scores = np.array([own[i] for i in ids], dtype=np.float64)
                pos_scores = [own[doc_index[p]] for p in positives]
            else:
                scores = block[j, ids]
                pos_scores = [float(block[j, doc_index[p]]) if p in doc_index
                              else float(index.score_documents(query_tokens[b_start + j], [outside_tokens[p]])[0])
                              for p in positives]
            if dblock is not None:
                score_filtered += _select_model_aware(record, positives, ids, scores, pos_scores, dblock[j],
                                                      q_emb[b_start + j], doc_index, outside_emb, doc_texts, config,
                                                      rng, rows, kinds, dropped)
                continue
            limits = [config.max_relative_score * s if config.max_relative_score is not None and s > 0
                      else None for s in pos_scores]  # no signal when the positive itself scores <= 0
            n_over = max([int(np.count_nonzero(scores > m)) for m in limits if m is not None], default=0)
            order = rank_candidates(scores, rng, max(config.skip_top, n_over) + config.hard_top_k,
                                    config.easy_bottom_k)
            ranked_ids, ranked_scores = ids[order], scores[order]
            for positive, pos_score, limit in zip(positives, pos_scores, limits):
                sel = select_negatives(ranked_ids, ranked_scores, rng, num_negatives=config.num_negatives,
                                       num_hard=config.num_hard, hard_top_k=config.hard_top_k,
                                       easy_bottom_k=config.easy_bottom_k, skip_top=config.skip_top,
                                       max_score=limit)
                score_filtered += sel.score_filtered
                if sel.drop_reason:
                    dropped[sel.drop_reason] += 1
                    continue
                kinds.update(sel.kinds)
                rows.append({"query": record.query, "positive": positive,
                             "negative": [doc_texts[i] for i in sel.ids],
                             "mining": {"mode": config.mode, "kinds": sel.kinds, "bm25": sel.scores,
                                        "positive_bm25": pos_score},
                             **candidate_pools(sel, doc_texts, config)})
        selection_seconds += time.perf_counter() - t0

    teacher_info = add_teacher_scores(rows, config.teacher, encoder_settings) if config.teacher else None
    total = time.perf_counter() - start_time
    report = {
        "mode": config.mode,
        "queries": len(shard),
        "queries_total": len(records),
        "queries_without_positive": queries_without_positive,
        "rows_written": len(rows),
        "rows_dropped": {reason: dropped[reason] for reason in DROP_REASONS},
        "negatives": {kind: kinds[kind] for kind in ("hard", "easy", "random")},
        "score_filtered_candidates": score_filtered,
        "excluded": {k: excluded[k] for k in ("own_positive", "normalized_duplicate", "same_query_positive",
                                               "query_text")},
        "documents": index.num_docs,
        "corpus": "pools" if config.mode == "pool" else ("file" if corpus is not None else "positives"),
        "vocabulary": len(index.vocab),
        "tokenization": {**tok, "seconds": round(tok["seconds"], 3)},
        "index_seconds": round(build_seconds, 3),
        "scoring_seconds": round(scoring_seconds, 3),
        "selection_seconds": round(selection_seconds, 3),
        "total_seconds": round(total, 3),
        "queries_per_second": round(len(shard) / total, 1) if total > 0 else None,
        "shard": {"num_shards": config.num_shards, "shard_index": config.shard_index,
                  "query_start": q_start, "query_end": q_end},
        "input_fingerprint": records_fingerprint(records),
        "scorer": config.scorer,
        "embedding": embedding_info or None,
        "teacher": teacher_info,
        "config": dataclasses.asdict(config),
    }
    return MiningResult(rows=rows, report=report)


def _select_model_aware(record: Record, positives: list[str], ids: np.ndarray, bm25_scores: np.ndarray,
                        pos_bm25: list[float], dense_row: np.ndarray, q_vec: np.ndarray, doc_index: dict[str, int],
                        outside_emb: dict, doc_texts: list[str], config: MiningConfig,
                        rng: np.random.Generator, rows: list[dict], kinds: Counter, dropped: Counter) -> int:
    """Rows of one query ranked by the dense model (or RRF of BM25 and dense): candidates above the
    positive-aware limit are removed first, then ``skip_top`` and the hard/easy selection apply to the rest.
    Appends to ``rows``; returns the number of candidates the limit removed."""
    dense = dense_row[ids]  # [candidates]
    ranking = dense if config.scorer == "dense" else rrf_scores(bm25_scores, dense)
    filtered = 0
    for positive, p_bm25 in zip(positives, pos_bm25):
        p_dense = float(dense_row[doc_index[positive]]) if positive in doc_index \
            else float(outside_emb[positive] @ q_vec)
        limit = positive_limit(p_dense, config.max_relative_score, config.max_score_margin)
        keep = np.ones(len(ids), dtype=bool) if limit is None else dense.astype(np.float64) <= limit
        filtered += int(len(ids) - keep.sum())
        cand, cand_rank = ids[keep], ranking[keep]
        order = rank_candidates(cand_rank, rng, config.skip_top + config.hard_top_k, config.easy_bottom_k)
        sel = select_negatives(cand[order], cand_rank[order], rng, num_negatives=config.num_negatives,
                               num_hard=config.num_hard, hard_top_k=config.hard_top_k,
                               easy_bottom_k=config.easy_bottom_k, skip_top=config.skip_top)
        if sel.drop_reason:
            short_anyway = len(ids) - min(len(ids), config.skip_top) < config.num_negatives
            dropped["too_few_negatives" if short_anyway else "max_relative_score"] += 1
            continue
        kinds.update(sel.kinds)
        pos_of = {int(i): k for k, i in enumerate(ids.tolist())}
        chosen = [pos_of[int(i)] for i in sel.ids]
        mining = {"mode": config.mode, "kinds": sel.kinds, "scorer": config.scorer,
                  "bm25": [float(bm25_scores[k]) for k in chosen],
                  "positive_bm25": p_bm25, "dense": [round(float(dense[k]), 6) for k in chosen],
                  "positive_dense": round(p_dense, 6)}
        if config.scorer == "hybrid":
            mining["rrf"] = [round(float(ranking[k]), 6) for k in chosen]
        rows.append({"query": record.query, "positive": positive, "negative": [doc_texts[i] for i in sel.ids],
                     "mining": mining, **candidate_pools(sel, doc_texts, config)})
    return filtered


def candidate_pools(sel: Selection, doc_texts: list[str], config: MiningConfig) -> dict:
    """``{"negative_candidates": {kind: [text, ...]}}`` for the row of ``sel`` (its hard and easy pools, each
    holding the negatives drawn from it), or ``{}`` when candidates are off or no pool is larger than its draw."""
    if not config.candidates or not sel.pools:
        return {}
    return {"negative_candidates": {kind: [doc_texts[i] for i in ids] for kind, ids in sel.pools.items()}}


class _Normalizer(dict):
    """normalize_text, memoised for one mining run."""

    def __missing__(self, text: str) -> str:
        self[text] = value = normalize_text(text)
        return value

    __call__ = dict.__getitem__


def _candidate_ids(record: Record, mode: str, num_docs: int, doc_index: dict[str, int], doc_texts: list[str],
                   norm: _Normalizer, norm_docs: dict[str, list[int]], same_query: dict[str, list[str]],
                   excluded: Counter) -> np.ndarray:
    """Document ids a query may take negatives from (pool: its own negatives), minus its positives and
    their duplicates; counts what was excluded and why into ``excluded``."""
    own = set(record.positives)
    reasons: dict[int, str] = {}
    for p_norm in {norm(p) for p in own}:
        for i in norm_docs.get(p_norm, ()):
            reasons[i] = "own_positive" if doc_texts[i] in own else "normalized_duplicate"
    if mode == "corpus":
        q_norm = norm(record.query)
        for p in same_query.get(q_norm, ()):
            for i in norm_docs.get(norm(p), ()):
                reasons.setdefault(i, "same_query_positive")
        for i in norm_docs.get(q_norm, ()):
            reasons.setdefault(i, "query_text")
        keep = np.ones(num_docs, dtype=bool)
        keep[list(reasons)] = False
        excluded.update(reasons.values())
        return np.flatnonzero(keep)
    ids = np.fromiter(dict.fromkeys(doc_index[t] for t in record.negatives), dtype=np.int64)
    if not reasons:
        return ids
    pool = set(ids.tolist())
    reasons = {i: r for i, r in reasons.items() if i in pool}
    excluded.update(reasons.values())
    return ids[~np.isin(ids, np.fromiter(reasons, dtype=np.int64))]


def report_path(output: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(output)}.report.json")


def report_beside(output: str | os.PathLike) -> Any:
    """The report `hfemb mine` wrote beside ``output`` (`report_path`): None when there is no such file,
    `HfembError` when it cannot be read."""
    path = report_path(output)
    return read_json(path) if path.is_file() else None


def write_output(result: MiningResult, output: str | os.PathLike) -> None:
    """Rows as JSONL at ``output`` and the report beside it, both atomically."""
    write_jsonl(output, result.rows)
    write_json(report_path(output), result.report)


_SUMMED = ("queries", "queries_without_positive", "rows_written", "score_filtered_candidates",
           "index_seconds", "scoring_seconds", "selection_seconds", "total_seconds")


# MiningConfig fields that do not change the rows written: shards of one run may differ in them
SETTINGS_NOT_IN_ROWS = frozenset({"shard_index", "workers", "cache_dir", "use_cache"})


def merge_shards(paths: Sequence[str | os.PathLike], output: str | os.PathLike) -> dict:
    """Join shard outputs (each with its ``.report.json``) into ``output`` in the original query order.

    Refuses a set that is not exactly shards 0..k-1 of one run (same input, same settings).
    """
    if not paths:
        raise HfembError("no shard files to merge")
    reports = []
    for path in paths:
        try:
            with open(report_path(path), encoding="utf-8") as fh:
                reports.append(json.load(fh))
        except (OSError, ValueError) as exc:
            raise HfembError(f"{path}: cannot read its shard report {report_path(path)}: {exc}") from None
    for path, rep in zip(paths, reports):
        if not (isinstance(rep, dict) and isinstance(rep.get("config"), dict) and isinstance(rep.get("shard"), dict)
                and isinstance(rep["shard"].get("shard_index"), int)):
            raise HfembError(f"{report_path(path)}: not a shard report of `hfemb mine --num-shards` (no config/shard)")
    first = reports[0]
    settings = {k: v for k, v in first["config"].items() if k not in SETTINGS_NOT_IN_ROWS}
    for path, rep in zip(paths, reports):
        if rep.get("input_fingerprint") != first.get("input_fingerprint"):
            raise HfembError(f"{path}: mined from a different input than {paths[0]}")
        differ = sorted(k for k in (set(settings) | set(rep["config"])) - SETTINGS_NOT_IN_ROWS
                        if rep["config"].get(k) != settings.get(k))
        if differ:
            raise HfembError(f"{path}: mined with different settings than {paths[0]} ({', '.join(differ)})")
    indices = sorted(rep["shard"]["shard_index"] for rep in reports)
    num_shards = first["shard"]["num_shards"]
    if indices != list(range(num_shards)):
        raise HfembError(f"shards {indices} given, expected each of 0..{num_shards - 1} exactly once")
    ordered = sorted(zip(reports, paths), key=lambda rp: rp[0]["shard"]["shard_index"])
    rows = []
    for rep, path in ordered:
        shard_rows = []
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        shard_rows.append(json.loads(line))
                    except ValueError as exc:
                        raise HfembError(f"{path}:{line_no}: invalid JSON ({exc.msg}); re-mine this shard") from None
        if len(shard_rows) != rep["rows_written"]:
            raise HfembError(f"{path}: {len(shard_rows)} rows but its report says {rep['rows_written']}")
        rows.extend(shard_rows)
    merged = dict(first)
    for key in _SUMMED:
        merged[key] = round(sum(rep[key] for rep in reports), 3) if isinstance(first[key], float) else \
            sum(rep[key] for rep in reports)
    for key in ("rows_dropped", "negatives", "excluded"):
        merged[key] = {k: sum(rep[key][k] for rep in reports) for k in first[key]}
    merged["tokenization"] = {k: (max if k == "workers" else sum)(rep["tokenization"][k] for rep in reports)
                              for k in first["tokenization"]}
    merged["queries_per_second"] = round(merged["queries"] / merged["total_seconds"], 1) \
        if merged["total_seconds"] else None
    merged["shard"] = {"num_shards": num_shards, "merged_from": [os.fspath(p) for _, p in ordered]}
    merged["config"] = {**first["config"], "shard_index": None}
    write_output(MiningResult(rows, merged), output)
    return merged
