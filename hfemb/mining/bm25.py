"""Text tokenisers with an on-disk cache, and sparse BM25.

Tokenisers (the same one must be used for queries and documents):

* ``jieba``: Chinese word segmentation (``jieba.lcut``, HMM on); whitespace-only tokens are dropped.
  Large inputs are segmented in parallel processes; the result equals the serial one.
* ``regex``: lower-cased ``\\w+`` words (English and other space-separated languages).
* ``char``: every non-space character.

No tokeniser ever yields a token that contains a space, which the cache format relies on.

:class:`BM25` reproduces ``rank_bm25.BM25Okapi`` scores exactly (same idf with its epsilon floor, same
k1/b) but stores the per-term weights once as a scipy CSR matrix, so scoring a query touches only the
postings of its terms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import sparse

from hfemb.errors import ConfigError
from hfemb.io_utils import atomic_open, cache_root

TOKENIZERS = ("jieba", "regex", "char")
# Bump when the post-processing of a tokeniser changes: cached token files then stop matching.
_TOKENIZER_REVISION = {"jieba": "1", "regex": "1", "char": "1"}
PARALLEL_MIN_TEXTS = 5000  # below this, jieba runs in-process (starting workers costs ~1 s)
_PARALLEL_CHUNK = 500
_WORD_RE = re.compile(r"\w+")


# ----------------------------------------------------------------------------------------- tokenisers
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def _tokenize_jieba(texts: Sequence[str]) -> list[list[str]]:
    lcut = _jieba().lcut
    return [[t for t in lcut(text) if not t.isspace()] for text in texts]


def _tokenize_regex(texts: Sequence[str]) -> list[list[str]]:
    return [_WORD_RE.findall(text.lower()) for text in texts]


def _tokenize_char(texts: Sequence[str]) -> list[list[str]]:
    return [[c for c in text if not c.isspace()] for text in texts]


_TOKENIZE = {"jieba": _tokenize_jieba, "regex": _tokenize_regex, "char": _tokenize_char}


def _jieba_joined(texts: Sequence[str]) -> list[str]:
    """Worker side: tokens joined by spaces (no token has one), much cheaper to send back than lists."""
    return [" ".join(doc) for doc in _tokenize_jieba(texts)]


def _init_jieba_worker() -> None:
    _jieba().initialize()  # no-op when inherited already initialised through fork


def tokenizer_version(name: str) -> str:
    """Identity of a tokeniser's output, part of the cache key (library version + our revision)."""
    check_tokenizer(name)
    if name == "jieba":
        jieba = _jieba()
        return f"jieba-{jieba.__version__}-dict:{jieba.dt.dictionary or 'default'}-r{_TOKENIZER_REVISION[name]}"
    return f"{name}-r{_TOKENIZER_REVISION[name]}"


def check_tokenizer(name: str) -> None:
    if name not in _TOKENIZE:
        raise ConfigError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def default_cache_dir() -> Path:
    """``$HFEMB_CACHE/tokens`` if set, else ``~/.cache/hfemb/tokens``."""
    return cache_root() / "tokens"


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 over the texts, each length-prefixed (so no separator can collide)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass
class TokenizeStats:
    """What :func:`tokenize` did: texts, seconds, whether the cache answered, worker processes used."""

    texts: int = 0
    seconds: float = 0.0
    cache_hit: bool = False
    workers: int = 1
    cache_path: str | None = None


def tokenize(
    texts: Sequence[str],
    tokenizer: str = "jieba",
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    parallel_min_texts: int = PARALLEL_MIN_TEXTS,
    stats: TokenizeStats | None = None,
) -> list[list[str]]:
    """Tokenise ``texts``; cached on disk under (tokeniser, version, hash of the texts).

    ``workers`` (default: CPU count) processes segment jieba inputs of at least ``parallel_min_texts``
    texts, in order-preserving chunks. ``stats`` (optional) is filled in.
    """
    check_tokenizer(tokenizer)
    texts = list(texts)
    stats = stats if stats is not None else TokenizeStats()
    stats.texts, stats.cache_hit, stats.workers = len(texts), False, 1
    start = time.perf_counter()
    path = None
    if use_cache:
        key = hashlib.sha256(f"{tokenizer}|{tokenizer_version(tokenizer)}|{texts_fingerprint(texts)}".encode())
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"{tokenizer}-{key.hexdigest()[:32]}.json"
        stats.cache_path = str(path)
        cached = _load_cache(path, len(texts))
        if cached is not None:
            stats.cache_hit, stats.seconds = True, time.perf_counter() - start
            return cached
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    if tokenizer == "jieba" and workers > 1 and len(texts) >= parallel_min_texts:
        tokens = _tokenize_parallel(texts, workers)
        stats.workers = workers
    else:
        tokens = _interned(_TOKENIZE[tokenizer](texts))
    if path is not None:
        _save_cache(path, tokens)
    stats.seconds = time.perf_counter() - start
    return tokens


def _interned(docs) -> list[list[str]]:
    """Token lists with one shared ``str`` per distinct token: a fresh string per token costs ~80 bytes
    (Chinese), ~8 GB of token lists at 1M documents; shared ones leave the 8-byte list slots."""
    table: dict[str, str] = {}
    return [[table.setdefault(t, t) for t in doc] for doc in docs]


def _split_interned(joined_docs) -> list[list[str]]:
    """Split space-joined token strings (the cache's and the jieba workers' form) into interned token lists."""
    return _interned(doc.split(" ") if doc else [] for doc in joined_docs)


def _tokenize_parallel(texts: list[str], workers: int) -> list[list[str]]:
    import multiprocessing

    _init_jieba_worker()  # forked workers inherit the loaded dictionary
    chunks = [texts[i:i + _PARALLEL_CHUNK] for i in range(0, len(texts), _PARALLEL_CHUNK)]
    with multiprocessing.get_context().Pool(min(workers, len(chunks)), initializer=_init_jieba_worker) as pool:
        parts = pool.map(_jieba_joined, chunks, chunksize=1)
    return _split_interned(doc for part in parts for doc in part)


def _load_cache(path: Path, n: int) -> list[list[str]] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            docs = json.load(fh)["docs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: re-tokenise (and overwrite)
    if not isinstance(docs, list) or len(docs) != n:
        return None
    return _split_interned(docs)


def _save_cache(path: Path, tokens: list[list[str]]) -> None:
    try:
        with atomic_open(path) as fh:
            json.dump({"docs": [" ".join(doc) for doc in tokens]}, fh, ensure_ascii=False)
    except OSError as exc:  # a read-only cache must not stop mining
        logging.getLogger(__name__).warning("could not write token cache %s: %s", path, exc)


# ----------------------------------------------------------------------------------------------- BM25
IDF_KINDS = ("okapi", "lucene")


@dataclass
class BM25:
    """Okapi BM25 over a tokenised corpus, as a (docs x vocab) CSR matrix of per-term weights.

    ``idf="okapi"`` is exactly ``rank_bm25.BM25Okapi``: ``log((N - n + 0.5) / (n + 0.5))``, and terms with
    a negative idf (in more than half of the documents) get ``epsilon * mean(idf)``. Its quirks: a term in
    exactly half of the documents gets idf 0 (it contributes nothing) while a term in more than half gets a
    small positive floor, so a more frequent term can outweigh a rarer one; on tiny corpora (a few
    candidates) many terms are hit by this.
    ``idf="lucene"`` is Lucene's ``log(1 + (N - n + 0.5) / (n + 0.5))``: always > 0 and decreasing in n,
    so every shared term counts and rarer terms always count more.
    Weight of term t in document d: ``idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))``;
    a query's score is the sum over its tokens (a repeated query token counts again, as in rank-bm25);
    unknown tokens score 0.
    """

    corpus_tokens: list[list[str]] = field(repr=False)
    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25
    idf_kind: str = "okapi"

    def __post_init__(self) -> None:
        if self.idf_kind not in IDF_KINDS:
            raise ConfigError(f"unknown idf {self.idf_kind!r}; choose one of {', '.join(IDF_KINDS)}")
        if not self.corpus_tokens:
            raise ConfigError("BM25 needs at least one document")
        vocab: dict[str, int] = {}
        term_ids = [vocab.setdefault(t, len(vocab)) for doc in self.corpus_tokens for t in doc]
        lengths = np.fromiter((len(doc) for doc in self.corpus_tokens), np.int64, len(self.corpus_tokens))
        n_docs = len(lengths)
        rows = np.repeat(np.arange(n_docs), lengths)
        tf = sparse.csr_matrix(  # duplicates (doc, term) are summed: term frequencies
            (np.ones(len(term_ids)), (rows, np.asarray(term_ids, dtype=np.int64))), shape=(n_docs, len(vocab))
        )
        tf.sum_duplicates()
        self.vocab = vocab
        self.doc_len = lengths
        self.avgdl = float(lengths.sum()) / n_docs
        self.doc_freq = np.bincount(tf.indices, minlength=len(vocab))
        self.idf = self._compute_idf(self.doc_freq, n_docs)
        self.doc_norm = self._length_norm(lengths)
        self.weights = tf  # (docs x vocab): BM25 weight of each (document, term) posting
        self.weights.data = self._term_weights(tf.data, np.repeat(self.doc_norm, np.diff(tf.indptr)), tf.indices)
        self._weights_t = self.weights.T.tocsr()  # (vocab x docs): one row of postings per term

    @property
    def num_docs(self) -> int:
        return len(self.doc_len)

    def _compute_idf(self, df: np.ndarray, n_docs: int) -> np.ndarray:
        if len(df) == 0:
            return np.zeros(0)
        if self.idf_kind == "lucene":
            return np.log1p((n_docs - df + 0.5) / (df + 0.5))
        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
        floor = self.epsilon * (math.fsum(idf) / len(idf))  # rank-bm25 averages before flooring
        return np.where(idf < 0, floor, idf)

    def _length_norm(self, lengths: np.ndarray) -> np.ndarray:
        # k1 * (1 - b + b * |d| / avgdl); with an all-empty corpus there are no postings to weight
        ratio = lengths / self.avgdl if self.avgdl > 0 else np.zeros(len(lengths))
        return self.k1 * (1 - self.b + self.b * ratio)

    def _term_weights(self, tf: np.ndarray, norm: np.ndarray, term_ids: np.ndarray) -> np.ndarray:
        return self.idf[term_ids] * (tf * (self.k1 + 1) / (tf + norm))

    def query_matrix(self, queries_tokens: Sequence[Sequence[str]]) -> sparse.csr_matrix:
        """(queries x vocab) token counts; tokens not in the corpus are dropped (they score 0)."""
        indptr, indices, data = [0], [], []
        vocab = self.vocab
        for tokens in queries_tokens:
            counts = Counter(vocab[t] for t in tokens if t in vocab)
            indices.extend(counts.keys())
            data.extend(counts.values())
            indptr.append(len(indices))
        return sparse.csr_matrix(
            (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
            shape=(len(queries_tokens), len(vocab)),
        )

    def score_batch(self, queries_tokens: Sequence[Sequence[str]]) -> np.ndarray:
        """Dense (queries x docs) scores of one batch of queries; keep batches small on big corpora."""
        return (self.query_matrix(queries_tokens) @ self._weights_t).toarray()

    def get_scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """Scores of one query against every document (same as ``BM25Okapi.get_scores``)."""
        return self.score_batch([query_tokens])[0]

    def top_k(self, queries_tokens: Sequence[Sequence[str]], k: int, batch_size: int = 128
              ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` documents per query, ``(ids, scores)`` each (queries x k), best first.

        Queries are scored in batches (never a dense matrix for all queries); ``np.argpartition`` picks
        each row's top k, ordered by score then document index (which of several documents tied at the
        k-th place are kept is up to ``argpartition``).
        """
        k = max(0, min(k, self.num_docs))
        if k == 0:
            return np.empty((len(queries_tokens), 0), dtype=np.int64), np.empty((len(queries_tokens), 0))
        ids = np.empty((len(queries_tokens), k), dtype=np.int64)
        scores = np.empty((len(queries_tokens), k))
        for start in range(0, len(queries_tokens), batch_size):
            block = self.score_batch(queries_tokens[start:start + batch_size])  # (batch x docs)
            part = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < self.num_docs else \
                np.broadcast_to(np.arange(self.num_docs), block.shape)
            part_scores = np.take_along_axis(block, part, axis=1)
            order = np.lexsort((part, -part_scores), axis=1)
            ids[start:start + len(block)] = np.take_along_axis(part, order, axis=1)
            scores[start:start + len(block)] = np.take_along_axis(part_scores, order, axis=1)
        return ids, scores

    def score_documents(self, query_tokens: Sequence[str], docs_tokens: Sequence[Sequence[str]]) -> np.ndarray:
        """Scores of one query against documents that need not be in the corpus, with the corpus's
        idf and average length (what a document would score if it were one more, unindexed, document)."""
        out = np.zeros(len(docs_tokens))
        query = Counter(t for t in query_tokens if t in self.vocab)
        for i, doc in enumerate(docs_tokens):
            tf = Counter(doc)
            norm = self._length_norm(np.array([len(doc)]))[0]
            for term, count in query.items():
                if term in tf:
                    out[i] += count * self._term_weights(np.float64(tf[term]), norm, self.vocab[term])
        return out
