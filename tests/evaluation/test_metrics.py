"""hfemb.evaluation.metrics against sklearn and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, f1_score, ndcg_score, precision_score,
                             recall_score, roc_auc_score)

from hfemb.errors import ConfigError
from hfemb.evaluation.metrics import (bagged_threshold, best_f1, bootstrap_best_threshold, bootstrap_f1, grouped_metrics, parse_thresholds,
                           query_confusion, resample_weights, roc_auc, threshold_sweep, average_precision)


def _random_case(seed: int, n: int = 400, tied: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.normal(0.5 + 0.15 * y, 0.15)
    if tied:  # heavy ties, including ties across classes and exactly on sweep thresholds
        s = np.round(s, 1)
    return y, s


# ---------------------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("spec, expected", [
    ("0.4:0.7", [0.4, 0.5, 0.6, 0.7]),
    ("0.4:0.7:0.05", [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]),
    ("0.1:0.3", [0.1, 0.2, 0.3]),
    ("0.4,0.45,0.5", [0.4, 0.45, 0.5]),
    (" 0.5 , 0.4 ", [0.4, 0.5]),
    ("0.4:0.75:0.1", [0.4, 0.5, 0.6, 0.7]),
    ("0.5", [0.5]),
    ("-0.2:0:0.1", [-0.2, -0.1, 0.0]),
])
def test_parse_thresholds(spec, expected):
    got = parse_thresholds(spec)
    assert got == expected  # exact: no 0.30000000000000004
    assert all(repr(v) == repr(e) for v, e in zip(got, expected))


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("0.4:abc", "stop 'abc' is not a number"),
    ("x:0.7", "start 'x' is not a number"),
    ("0.4:0.7:0", "step '0' must be > 0"),
    ("0.4:0.7:-0.1", "must be > 0"),
    ("0.7:0.4", "greater than stop"),
    ("0.1:0.2:0.3:0.4", "got 4 fields"),
    ("0.4,,0.5", "'' is not a number"),
    ("0.4,abc", "value 'abc' is not a number"),
    ("0.4:1.5", "outside [-1, 1]"),
    ("0:1:0.0001", "at most"),
    ("0.4:0.7,0.8", "not both"),
    ("nan", "not a finite number"),
])
def test_parse_thresholds_errors(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_thresholds(spec)
    assert message in str(err.value)


# ---------------------------------------------------------------------------------- threshold metrics
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_matches_sklearn(seed, tied):
    y, s = _random_case(seed, tied=tied)
    thresholds = [0.3, 0.4, 0.5, 0.6, 0.7, 2.0]
    for row in threshold_sweep(y, s, thresholds):
        pred = (s >= row["threshold"]).astype(int)
        assert row["precision"] == pytest.approx(precision_score(y, pred, zero_division=0), abs=1e-12)
        assert row["recall"] == pytest.approx(recall_score(y, pred, zero_division=0), abs=1e-12)
        assert row["f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
        assert row["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert row["positive_rate"] == pytest.approx(pred.mean(), abs=1e-12)
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == len(y)


def test_sweep_is_inclusive_and_graded():
    labels = [0, 1, 2, 2]
    scores = [0.5, 0.5, 0.49, 0.9]
    (row,) = threshold_sweep(labels, scores, [0.5], label_threshold=2)  # only label 2 is relevant
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (1, 2, 1, 0)
    assert row["precision"] == pytest.approx(1 / 3) and row["recall"] == 0.5


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_best_f1_threshold_reproduces_sklearn_f1(seed, tied):
    y, s = _random_case(seed, n=300, tied=tied)
    best = best_f1(y, s)
    pred = (s >= best["threshold"]).astype(int)
    assert best["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    assert best["precision"] == pytest.approx(precision_score(y, pred), abs=1e-12)
    assert best["recall"] == pytest.approx(recall_score(y, pred), abs=1e-12)
    # no threshold does better: brute force over every distinct score
    brute = max(f1_score(y, (s >= t).astype(int)) for t in np.unique(s))
    assert best["f1"] == pytest.approx(brute, abs=1e-12)


def test_auc_ap_match_sklearn():
    for tied in (False, True):
        y, s = _random_case(7, tied=tied)
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert math.isnan(average_precision([0, 0], [0.2, 0.3]))


# ---------------------------------------------------------------------------------- grouped metrics
def test_grouped_metrics_by_hand():
    # query 0: ranking by score -> labels [0, 1, 1, 0]; query 1: [2, 0, 1]; query 2: no positive
    groups = [0, 0, 0, 0, 1, 1, 1, 2, 2]
    labels = [1, 0, 0, 1, 0, 2, 1, 0, 0]
    scores = [0.8, 0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.9, 0.1]
    m = grouped_metrics(groups, labels, scores, k=10, recall_ks=(1, 2, 10))
    assert m["queries"] == 2 and m["queries_without_positive"] == 1
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    lg = math.log2
    ndcg0 = (1 / lg(3) + 1 / lg(4)) / (1 / lg(2) + 1 / lg(3))
    ndcg1 = (2 / lg(2) + 1 / lg(4)) / (2 / lg(2) + 1 / lg(3))
    assert m["ndcg@10"] == pytest.approx((ndcg0 + ndcg1) / 2)
    assert m["recall@1"] == pytest.approx((0 / 2 + 1 / 2) / 2)  # query 1 has 2 relevant (labels 2 and 1)
    assert m["recall@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["recall@10"] == pytest.approx(1.0)


def test_grouped_metrics_k_cutoff_threshold_and_ties():
    # relevant item at rank 3 (0-based) -> outside k=3: MRR@3 = 0
    m = grouped_metrics([5, 5, 5, 5], [0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6], k=3, recall_ks=(3,))
    assert m["mrr@3"] == 0.0 and m["ndcg@3"] == 0.0 and m["recall@3"] == 0.0
    # label_threshold=2: label 1 is not relevant for MRR/recall, but is a gain for nDCG
    m = grouped_metrics([0, 0], [1, 2], [0.9, 0.1], label_threshold=2, k=10, recall_ks=(1,))
    assert m["mrr@10"] == 0.5 and m["recall@1"] == 0.0
    assert m["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    # ties are broken by input order
    m = grouped_metrics([0, 0], [0, 1], [0.5, 0.5], recall_ks=(1,))
    assert m["mrr@10"] == 0.5


def test_grouped_ndcg_matches_sklearn_on_random_queries():
    rng = np.random.default_rng(0)
    groups, labels, scores, per_query = [], [], [], []
    for q in rng.permutation(30):  # unsorted, non-contiguous ids
        n = int(rng.integers(2, 25))
        lab = rng.integers(0, 3, n)
        lab[0] = max(lab[0], 1)
        sc = rng.random(n)
        groups += [q] * n
        labels += lab.tolist()
        scores += sc.tolist()
        per_query.append(ndcg_score([lab], [sc], k=10))
    m = grouped_metrics(groups, labels, scores)
    assert m["ndcg@10"] == pytest.approx(np.mean(per_query), abs=1e-12)


# ----------------------------------------------------------------------------------------- bootstrap
def _resampled_f1_by_loop(groups, y, s, threshold, n_boot, seed):
    """Reference: draw queries with replacement with the same multinomial counts, rebuild the rows."""
    rng = np.random.default_rng(seed)
    n_groups = groups.max() + 1
    out = []
    for _ in range(n_boot):
        counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups))
        rows = np.concatenate([np.flatnonzero(groups == q).repeat(c) for q, c in enumerate(counts)] + [[]]).astype(int)
        out.append(f1_score(y[rows], (s[rows] >= threshold).astype(int), zero_division=0))
    return np.array(out)


def test_bootstrap_f1_equals_explicit_resampling():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(20), 5)
    y = (rng.random(100) < 0.4).astype(int)
    s_a, s_b = rng.random(100), np.clip(rng.random(100) + 0.2 * y, 0, 1)
    conf_a = query_confusion(groups, y, s_a, 0.5)
    conf_b = query_confusion(groups, y, s_b, 0.6)
    assert conf_a.sum(0).tolist() == [((s_a >= .5) & (y == 1)).sum(), ((s_a >= .5) & (y == 0)).sum(),
                                      ((s_a < .5) & (y == 1)).sum()]
    ci = bootstrap_f1([conf_a, conf_b], n_boot=50, seed=3)
    ref_a = _resampled_f1_by_loop(groups, y, s_a, 0.5, 50, 3)
    ref_b = _resampled_f1_by_loop(groups, y, s_b, 0.6, 50, 3)
    assert ci["f1"][0] == pytest.approx(tuple(np.percentile(ref_a, [2.5, 97.5])), abs=1e-12)
    assert ci["f1"][1] == pytest.approx(tuple(np.percentile(ref_b, [2.5, 97.5])), abs=1e-12)
    assert ci["diff"][1] == pytest.approx(tuple(np.percentile(ref_b - ref_a, [2.5, 97.5])), abs=1e-12)  # paired
    assert ci["diff"][0] == (0.0, 0.0)
    assert bootstrap_f1([conf_a, conf_b], n_boot=50, seed=3) == ci  # seeded


def test_bootstrap_best_threshold_brackets_the_point_estimate():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(60), 10)
    y = (rng.random(600) < 0.3).astype(int)
    s = np.round(rng.normal(0.4 + 0.3 * y, 0.1), 3)
    lo, hi = bootstrap_best_threshold(groups, y, s, n_boot=200, seed=0)
    point = best_f1(y, s)["threshold"]
    assert lo <= hi and lo <= point + 0.05 and point - 0.05 <= hi
    assert np.isin([lo, hi], s).all() or lo != hi  # percentiles of chosen score values
    # with all rows drawn exactly once (weights = 1) the vectorised choice equals sklearn's best F1
    only = bootstrap_best_threshold(np.zeros(600, int), y, s, n_boot=3, seed=0)
    assert best_f1(y, s)["f1"] == pytest.approx(f1_score(y, (s >= only[0]).astype(int)), abs=1e-12)


def _resampled_best_threshold_oracle(groups, y, s, counts):
    """One resample the slow way: each query's pairs repeated as often as it was drawn, then the best F1 over
    every candidate threshold by sklearn (the highest threshold on equal F1, as the vectorised code)."""
    take = np.concatenate([np.flatnonzero(groups == q).repeat(int(c)) for q, c in enumerate(counts)])
    yy, ss = y[take], s[take]
    scored = [(f1_score(yy, (ss >= t).astype(int), zero_division=0), t) for t in np.unique(ss)]
    best = max(f for f, _ in scored)
    return max(t for f, t in scored if f >= best - 1e-12)


def test_bagged_threshold_is_the_median_of_resampled_best_thresholds():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(25), 8)
    y = (rng.random(200) < 0.3).astype(int)
    s = np.round(rng.normal(0.45 + 0.2 * y, 0.12), 3)
    counts = np.concatenate(list(resample_weights(25, 31, seed=4)))  # the same resamples the function draws
    oracle = float(np.median([_resampled_best_threshold_oracle(groups, y, s, c) for c in counts]))
    assert bagged_threshold(groups, y, s, n_boot=31, seed=4) == pytest.approx(oracle, abs=1e-12)
    # the bagged choice is an interior point of the resampled choices, within the bootstrap interval
    lo, hi = bootstrap_best_threshold(groups, y, s, n_boot=31, seed=4)
    assert lo <= oracle <= hi
    assert np.isnan(bagged_threshold(groups, np.zeros(200, int), s))  # nothing relevant: nothing to choose


def test_bagged_threshold_skips_resamples_without_a_relevant_pair():
    """Only query 0 of 6 has relevant pairs: a resample that misses it has no F1 to maximise and must not vote
    (its argmax would be the highest score, a negative)."""
    groups = np.repeat(np.arange(6), 4)
    y = np.zeros(24, int)
    y[[0, 1]] = 1
    s = np.round(np.random.default_rng(1).uniform(0.1, 0.9, 24), 3)
    s[[0, 1]] = [0.58, 0.7]
    s[5] = 0.95  # a negative above both positives
    counts = np.concatenate(list(resample_weights(6, 41, seed=2)))
    votes = [_resampled_best_threshold_oracle(groups, y, s, c) for c in counts if c[0] > 0]
    assert 0 < len(votes) < 41  # some resamples miss query 0
    assert bagged_threshold(groups, y, s, n_boot=41, seed=2) == pytest.approx(float(np.median(votes)), abs=1e-12)
    lo, hi = bootstrap_best_threshold(groups, y, s, n_boot=41, seed=2)
    assert hi <= 0.7 < 0.95  # no resample's "choice" is the top negative
