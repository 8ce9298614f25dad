"""Splitting labelled data by query (seeded; a query's rows never straddle the split) and writing per-query
labelled pools; used by training's ``data.eval_ratio``, ``hfemb eval --split-dev`` and ``hfemb split``."""

from __future__ import annotations

from operator import attrgetter
from typing import Callable, Sequence, TypeVar

import numpy as np

from hfemb.data.records import Record, labelled_documents
from hfemb.errors import ConfigError, HfembError

T = TypeVar("T")


def split_by_query(items: Sequence[T], fraction: float, seed: int = 0, *,
                   query: Callable[[T], str] = attrgetter("query")) -> tuple[list[T], list[T]]:
    """``(held_out, rest)``: a seeded ``fraction`` of the distinct queries (``query(item)``, ``Record.query`` by
    default) with all their items, and the other items; both in input order. At least one query lands on
    each side (``fraction`` must be in (0, 1); fewer than 2 queries is an ``HfembError``)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the held-out fraction must be between 0 and 1 (exclusive), got {fraction}")
    queries = list(dict.fromkeys(map(query, items)))
    if len(queries) < 2:
        raise HfembError(f"cannot split {len(queries)} distinct query in two parts by query")
    n_held = min(max(int(round(fraction * len(queries))), 1), len(queries) - 1)
    order = np.random.default_rng(seed).permutation(len(queries))
    held = {queries[i] for i in order[:n_held]}
    return [r for r in items if query(r) in held], [r for r in items if query(r) not in held]


def pool_rows_by_query(records: Sequence[Record]) -> list[dict]:
    """One ``{"query", "documents": [{"content", "label"}]}`` row per query (records of a query merged,
    repeated documents kept once with their highest label), in first-seen order."""
    rows: dict[str, dict[str, int]] = {}
    for rec in records:
        docs = rows.setdefault(rec.query, {})
        for text, label in labelled_documents(rec):
            docs[text] = max(docs.get(text, label), int(label))
    return [{"query": q, "documents": [{"content": t, "label": l} for t, l in docs.items()]} for q, docs in rows.items()]
