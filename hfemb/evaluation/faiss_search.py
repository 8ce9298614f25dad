"""Optional FAISS top-k search (``pip install hfemb[faiss]``): the same answer contract as `exact_search`.

``search="faiss"``: ``IndexFlatIP``, exact (every inner product), in FAISS's memory layout and BLAS kernels; its
top-k equals `hfemb.evaluation.retrieval.exact_search` up to float rounding of the scores (tested to 1e-5).
``search="faiss-hnsw"``: ``IndexHNSWFlat`` (M = 32, efConstruction 200, efSearch max(256, 2k), inner product):
approximate -- a document can be missed, so Recall@100 / MAP@100 can only go down; it pays off on corpora of
millions of documents, and costs building the graph first (minutes at 1M). Its recall against the exact top-k
is what to check before trusting it (``bench/bench_retrieval.py --search-only ... --search faiss-hnsw``).
"""

from __future__ import annotations

import numpy as np

from hfemb.errors import ConfigError

SEARCHES = ("exact", "faiss", "faiss-hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256


def import_faiss():
    """The ``faiss`` module, or one clear ConfigError saying how to install it."""
    try:
        import faiss  # lazy: an optional dependency
    except ImportError:
        raise ConfigError("search 'faiss' needs the faiss package: pip install 'hfemb[faiss]' (or faiss-cpu), "
                          "or use search 'exact'") from None
    return faiss


def faiss_search(queries, corpus, k: int, *, kind: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of ``queries [Q, D]`` against ``corpus [N, D]`` with FAISS: (scores ``[Q, k]``
    float32, indices ``[Q, k]`` int64), best first, equal scores in corpus order (as `exact_search`)."""
    if kind not in ("faiss", "faiss-hnsw"):
        raise ConfigError(f"unknown FAISS search {kind!r}; expected faiss or faiss-hnsw")
    faiss = import_faiss()
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    c = np.ascontiguousarray(np.asarray(corpus, dtype=np.float32))
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"faiss_search: shapes {q.shape} and {c.shape} do not match")
    k = min(int(k), c.shape[0])
    if k == 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], k), np.float32), np.zeros((q.shape[0], k), np.int64)
    if kind == "faiss":
        index = faiss.IndexFlatIP(c.shape[1])
    else:
        index = faiss.IndexHNSWFlat(c.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * k)
    index.add(c)
    scores, idx = index.search(q, k)
    idx = idx.astype(np.int64)
    # HNSW may return fewer than k (-1): those slots sort last
    scores = np.where(idx < 0, -np.inf, scores).astype(np.float32)
    order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -scores), axis=1)  # score desc, corpus order
    return np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)
