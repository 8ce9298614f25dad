"""Corpus retrieval evaluation: exact top-k search by blocked matrix products, and the report of several models.

``evaluate_retrieval({"base": "sentence-transformers/all-MiniLM-L6-v2"}, read_beir("scifact"))`` encodes the
corpus once per model (``hfemb.evaluation.encoders.encode_texts``: the embedding cache, token-budget batches, a
progress bar in texts/s), searches every query's top-k exactly on the model's device (``exact_search``: never a
whole queries x corpus score matrix), and reports nDCG@10, MRR@10, Recall@1/5/10/100 and MAP@100
(``hfemb.evaluation.retrieval_metrics``, pytrec_eval's conventions) with bootstrap intervals over queries and
paired differences against the first model, plus the threshold sweep: F1 of "score >= t" over each query's
retrieved top ``sweep_k`` against the qrels, the threshold chosen on a dev split when there is one.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from hfemb.data.beir import RetrievalSet
from hfemb.errors import ConfigError, HfembError
from hfemb.evaluation import retrieval_metrics as rm
from hfemb.evaluation.encoders import encode_or_skip
from hfemb.evaluation.faiss_search import faiss_search, import_faiss
from hfemb.evaluation.retrieval_report import write_retrieval_report
from hfemb.evaluation.settings import EvalSettings

TOP_K = 100  # documents kept per query: Recall@100 and MAP@100 need them
SWEEP_K = 10  # the threshold sweep looks at each query's top 10 (what a RAG system would pass on)


def exact_search(queries, corpus, k: int, *, device=None, query_block: int = 256,
                 corpus_block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of ``queries [Q, D]`` against ``corpus [N, D]`` (normalised: cosine).

    Blocks of ``query_block`` queries meet blocks of ``corpus_block`` documents on ``device`` (default: the
    queries' device); each block's top-k is merged into a running top-k, so at most ``query_block x
    corpus_block`` scores exist at once. Returns (scores ``[Q, k]`` float32, indices ``[Q, k]`` int64), best first; equal
    scores keep corpus order. ``k`` larger than the corpus is cut to its size.
    """
    import torch

    q_all = torch.as_tensor(queries)
    c_all = torch.as_tensor(corpus)
    if q_all.ndim != 2 or c_all.ndim != 2 or q_all.shape[1] != c_all.shape[1]:
        raise ValueError(f"exact_search: shapes {tuple(q_all.shape)} and {tuple(c_all.shape)} do not match")
    device = torch.device(device) if device is not None else q_all.device
    k = min(int(k), c_all.shape[0])
    n_q = q_all.shape[0]
    out_s = np.empty((n_q, k), dtype=np.float32)
    out_i = np.empty((n_q, k), dtype=np.int64)
    corpus_blocks = [c_all[s:s + corpus_block].to(device, torch.float32) for s in range(0, c_all.shape[0], corpus_block)]
    with torch.no_grad():
        for qs in range(0, n_q, query_block):
            q = q_all[qs:qs + query_block].to(device, torch.float32)  # [b, D]
            best_s = torch.full((q.shape[0], 0), float("-inf"), device=device)
            best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
            offset = 0
            for block in corpus_blocks:
                scores = q @ block.T  # [b, n_block]
                blk_s, blk_i = torch.topk(scores, min(k, block.shape[0]), dim=1)  # the block's own top-k
                del scores
                cand_s, cand_i = torch.cat([best_s, blk_s], 1), torch.cat([best_i, blk_i + offset], 1)  # [b, <=2k]
                top_s, pos = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
                best_s, best_i = top_s, cand_i.gather(1, pos)
                offset += block.shape[0]
            s_np, i_np = best_s.cpu().numpy(), best_i.cpu().numpy()
            order = np.lexsort((i_np, -s_np), axis=1)  # score descending, then corpus order
            out_s[qs:qs + len(s_np)] = np.take_along_axis(s_np, order, 1)
            out_i[qs:qs + len(s_np)] = np.take_along_axis(i_np, order, 1)
    return out_s, out_i


def qrels_by_index(rset: RetrievalSet) -> list[dict[int, int]]:
    """``qrels`` as {document index: grade} per query (documents missing from the corpus get -1, -2, ...)."""
    pos = {d: i for i, d in enumerate(rset.doc_ids)}
    out = []
    for qid in rset.query_ids:
        judged, missing = {}, 0
        for did, grade in rset.qrels.get(qid, {}).items():
            if did in pos:
                judged[pos[did]] = grade
            else:
                missing += 1
                judged[-missing] = grade
        out.append(judged)
    return out


def score_run(scores: np.ndarray, ranked: np.ndarray, rset: RetrievalSet, *, label_threshold: int = 1,
              sweep_k: int = SWEEP_K) -> dict:
    """Per-query metrics and the top-``sweep_k`` lists (scores, relevant flags, relevant counts) of one search."""
    qrels = qrels_by_index(rset)
    per_query = rm.per_query_metrics(ranked, qrels, len(rset.doc_ids), label_threshold=label_threshold)
    grades = rm.grades_of(ranked[:, :sweep_k], qrels, len(rset.doc_ids))
    n_rel = np.array([sum(1 for g in j.values() if g >= label_threshold) for j in qrels], dtype=np.float64)
    valid = n_rel > 0
    return {"per_query": per_query, "valid": valid, "sweep_scores": scores[valid, :sweep_k],
            "sweep_hit": grades[valid] >= label_threshold, "n_rel": n_rel[valid]}


def summarize_run(run: dict, thresholds) -> dict:
    """Mean metrics, the threshold sweep and the best F1 of one scored search (no intervals)."""
    best = rm.topk_best_f1(run["sweep_scores"], run["sweep_hit"], run["n_rel"])
    return {**rm.mean_metrics(run["per_query"]), "queries": int(run["valid"].sum()),
            "queries_without_relevant": int((~run["valid"]).sum()),
            "best_f1": best["f1"], "best_threshold": best["threshold"], "best_precision": best["precision"],
            "best_recall": best["recall"],
            "sweep": rm.topk_sweep(run["sweep_scores"], run["sweep_hit"], run["n_rel"], thresholds)}


def search_encoded(q_emb: np.ndarray, d_emb: np.ndarray, k: int, device=None,
                   search: str = "exact") -> tuple[np.ndarray, np.ndarray, float]:
    """Top-``k`` by ``search`` (``exact``: `exact_search`; ``faiss`` / ``faiss-hnsw``:
    `hfemb.evaluation.faiss_search.faiss_search`, on the CPU) and the seconds it took."""
    started = time.perf_counter()
    if search == "exact":
        scores, ranked = exact_search(q_emb, d_emb, k, device=device)
    else:
        scores, ranked = faiss_search(q_emb, d_emb, k, kind=search)
    return scores, ranked, time.perf_counter() - started


def evaluate_retrieval(models: dict[str, str], rset: RetrievalSet, *, dev_set: RetrievalSet | None = None,
                       split_dev: float | None = None, settings=None, output_dir="eval_output",
                       top_k: int = TOP_K, sweep_k: int = SWEEP_K, print_table: bool = True) -> dict:
    """Evaluate ``models`` on a retrieval set; write results.json/.md/.csv into ``output_dir``; return the report.

    The threshold of the sweep is chosen on ``dev_set`` (e.g. BEIR's qrels/dev.tsv), or on a seeded fraction
    ``split_dev`` of the queries held out from ``rset``, else on ``rset`` itself (optimistic, flagged).
    """
    settings = settings or EvalSettings()
    if not models:
        raise ConfigError("no model to evaluate")
    if dev_set is not None and split_dev:
        raise ConfigError("give either a dev set or a dev split fraction, not both")
    if settings.search != "exact":
        import_faiss()  # not installed: one clear error before any model loads
    started = time.perf_counter()
    if split_dev:
        if not 0 < split_dev < 1:
            raise ConfigError(f"dev fraction must be between 0 and 1 (exclusive), got {split_dev}")
        order = np.random.default_rng(settings.seed).permutation(len(rset.query_ids))
        n_dev = min(max(int(round(split_dev * len(order))), 1), len(order) - 1)
        dev_ids = [rset.query_ids[i] for i in sorted(order[:n_dev])]
        test_ids = [rset.query_ids[i] for i in sorted(order[n_dev:])]
        rset, dev_set = rset.subset(test_ids, "test split"), rset.subset(dev_ids, f"dev split {split_dev:g}")
    if dev_set is not None and dev_set.doc_ids != rset.doc_ids:
        raise ConfigError("the dev set must search the same corpus as the eval set")
    queries = list(dict.fromkeys(rset.query_texts + (dev_set.query_texts if dev_set else [])))
    q_pos = {t: i for i, t in enumerate(queries)}
    # the corpus may repeat a text under two ids: encode distinct texts once, index back
    distinct_docs = list(dict.fromkeys(rset.doc_texts))
    d_pos = {t: i for i, t in enumerate(distinct_docs)}
    doc_rows = np.fromiter((d_pos[t] for t in rset.doc_texts), dtype=np.int64, count=len(rset.doc_texts))

    results, runs, failed = {}, {}, {}
    for name, spec in models.items():
        encoded = encode_or_skip(spec, name, queries, distinct_docs, settings, failed)
        if encoded is None:
            continue
        device = search_device(settings)
        corpus = encoded.documents[doc_rows] if len(distinct_docs) != len(doc_rows) else encoded.documents
        per_set = {}
        for part, data in (("eval", rset), ("dev", dev_set)):
            if data is None:
                continue
            q = encoded.queries[[q_pos[t] for t in data.query_texts]]
            scores, ranked, seconds = search_encoded(q, corpus, top_k, device, settings.search)
            per_set[part] = score_run(scores, ranked, data, label_threshold=settings.label_threshold, sweep_k=sweep_k)
            per_set[part]["search_seconds"] = seconds
        runs[name] = per_set
        summary = summarize_run(per_set["eval"], settings.thresholds)
        results[name] = {"model": spec, **encoded.info, "search": settings.search,
                         "search_device": str(device) if settings.search == "exact" else "cpu",
                         "search_seconds": round(per_set["eval"]["search_seconds"], 3),
                         "search_ms_per_query": round(1000 * per_set["eval"]["search_seconds"]
                                                      / max(len(rset.query_ids), 1), 4),
                         "retrieval": {k: summary[k] for k in (*rm.RETRIEVAL_METRICS, "queries",
                                                               "queries_without_relevant")},
                         "threshold": {k: summary[k] for k in ("best_f1", "best_threshold", "best_precision",
                                                               "best_recall", "sweep")}}
        if "dev" in per_set:
            results[name]["dev"] = summarize_run(per_set["dev"], settings.thresholds)
    if not results:
        raise HfembError("every model failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    choose_retrieval_thresholds(results, runs, settings)
    report = {
        "task": "retrieval",
        "models": results, "failed_models": failed, "reference_model": next(iter(results)),
        "data": {"eval": rset.stats, "dev": dev_set.stats if dev_set else None},
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("show_progress", "plots")},
                     "top_k": top_k, "sweep_k": sweep_k, "dev_split": split_dev,
                     "relevant": f"qrels grade >= {settings.label_threshold}",
                     "rule": f"a retrieved document (top {sweep_k}) with cosine similarity >= threshold is predicted "
                             "relevant; relevant documents not retrieved are false negatives",
                     "conventions": "pytrec_eval: nDCG gain = grade, ideal over all judged documents; queries "
                                    "without a relevant judgement left out"},
        "seconds": round(time.perf_counter() - started, 3),
    }
    markdown = write_retrieval_report(report, output_dir)
    if print_table:
        print(markdown)
    return report


def search_device(settings):
    import torch

    return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def choose_retrieval_thresholds(results: dict, runs: dict, settings) -> None:
    """Per model: the sweep threshold (best F1 on dev, else on eval), eval F1 there; bootstrap intervals of every
    metric and of the F1, with paired differences against the first model (same query resamples)."""
    names = list(results)
    confusions = []
    for name in names:
        res, run = results[name], runs[name]
        source = "dev" if "dev" in run else "eval"
        chosen = res["dev"]["best_threshold"] if source == "dev" else res["threshold"]["best_threshold"]
        if settings.threshold_rule == "bagged" and chosen == chosen:  # (NaN: nothing relevant to choose by)
            src = run[source]
            chosen = rm.topk_bagged_threshold(src["sweep_scores"], src["sweep_hit"], src["n_rel"],
                                              n_boot=settings.threshold_bags, seed=settings.seed)
        (row,) = rm.topk_sweep(run["eval"]["sweep_scores"], run["eval"]["sweep_hit"], run["eval"]["n_rel"], [chosen])
        res["threshold"].update({"chosen_threshold": chosen, "chosen_on": source, "threshold_rule": settings.threshold_rule,
                                 "f1_at_chosen": row["f1"],
                                 "precision_at_chosen": row["precision"], "recall_at_chosen": row["recall"]})
        confusions.append(rm.topk_confusion(run["eval"]["sweep_scores"], run["eval"]["sweep_hit"],
                                            run["eval"]["n_rel"], chosen))
    if not settings.n_bootstrap:
        return
    from hfemb.evaluation.metrics import bootstrap_f1

    f1_ci = bootstrap_f1(confusions, n_boot=settings.n_bootstrap, seed=settings.seed)
    first = results[names[0]]
    for i, name in enumerate(names):
        t = results[name]["threshold"]
        t["f1_at_chosen_ci"] = list(f1_ci["f1"][i])
        t["f1_diff_vs_first"] = t["f1_at_chosen"] - first["threshold"]["f1_at_chosen"]
        t["f1_diff_vs_first_ci"] = list(f1_ci["diff"][i])
    valid = runs[names[0]]["eval"]["valid"]
    for metric in rm.RETRIEVAL_METRICS:
        values = np.stack([runs[n]["eval"]["per_query"][metric][valid] for n in names])  # [M, Q]
        ci = rm.bootstrap_means(values, n_boot=settings.n_bootstrap, seed=settings.seed)
        for i, name in enumerate(names):
            r = results[name]["retrieval"]
            r.setdefault("ci", {})[metric] = list(ci["mean"][i])
            r.setdefault("diff_vs_first", {})[metric] = r[metric] - first["retrieval"][metric]
            r.setdefault("diff_vs_first_ci", {})[metric] = list(ci["diff"][i])
