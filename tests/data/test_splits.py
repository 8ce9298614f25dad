"""hfemb.data.splits: one split_by_query for training (dict rows) and evaluation (Records); per-query pools."""
from operator import itemgetter

import pytest

from hfemb.data.records import Record, labelled_documents
from hfemb.data.splits import pool_rows_by_query, split_by_query
from hfemb.errors import HfembError


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_both_sides_keep_a_query_whatever_the_fraction(fraction):
    rows = [{"query": q, "positive": f"d{i}"} for i, q in enumerate("aabbb")]
    held, rest = split_by_query(rows, fraction, seed=3, query=itemgetter("query"))
    assert len({r["query"] for r in held}) == 1 and len({r["query"] for r in rest}) == 1
    assert sorted(held + rest, key=itemgetter("positive")) == rows  # a partition, nothing lost
    assert [r["positive"] for r in held] == sorted(r["positive"] for r in held)  # input order kept


def test_rounding_and_order():
    records = [Record(f"q{i % 10}", [f"d{i}"]) for i in range(20)]
    held, rest = split_by_query(records, 0.25, seed=0)
    # round(2.5) = 2 queries held out (banker's rounding, as before), each with both its records
    assert len({r.query for r in held}) == 2 and len(held) == 4 and len(rest) == 16
    assert held == [r for r in records if r.query in {h.query for h in held}]


def test_one_query_cannot_be_split():
    with pytest.raises(HfembError, match="cannot split 1 distinct query"):
        split_by_query([Record("q", ["d"]), Record("q", ["e"])], 0.5)


def test_pool_rows_by_query_merges_records_and_keeps_highest_label():
    records = [Record("q", ["a"], ["b"]), Record("q", ["b"], ["c"]), Record("r", [], candidates=[("x", 2), ("y", 0)])]
    assert labelled_documents(records[0]) == [("a", 1), ("b", 0)]
    assert pool_rows_by_query(records) == [
        {"query": "q", "documents": [{"content": "a", "label": 1}, {"content": "b", "label": 1},
                                     {"content": "c", "label": 0}]},
        {"query": "r", "documents": [{"content": "x", "label": 2}, {"content": "y", "label": 0}]}]
