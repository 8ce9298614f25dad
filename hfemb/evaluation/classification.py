"""Evaluation as classification over a knowledge base (TCM syndrome differentiation).

Every case is scored against every knowledge entry (cosine similarity of the case query and the entry
text; label 1 for the case's own entry). Two views of the same scores:

* the standard threshold-sweep report of ``hfemb.evaluation.evaluate.evaluate`` on those labelled pairs (written as
  ``classification_pairs.jsonl``, one pool row per case with all entries: cases x entries pairs, so the
  file grows with both; the report, plots, threshold choice and bootstrap are evaluate()'s own);
* top-k accuracy of differentiation: a case is right at k when fewer than k *other* entries score at least
  as high as its own entry (ties count against the model), plus the mean rank of the right entry and the
  most frequent (label -> top-1 prediction) confusions.

The second pass encodes through ``hfemb.evaluation.encoders.encode_texts`` with the same settings, so with the
embedding cache on (the default) it reads the vectors the first pass wrote instead of running the model.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from hfemb.data.cases import CaseSettings, read_cases, read_knowledge
from hfemb.errors import ConfigError, HfembError
from hfemb.evaluation.encoders import encode_texts
from hfemb.evaluation.evaluate import evaluate
from hfemb.evaluation.settings import EvalSettings
from hfemb.io_utils import atomic_open, write_json, write_jsonl

PAIRS_FILE, DEV_PAIRS_FILE = "classification_pairs.jsonl", "classification_dev_pairs.jsonl"
RESULT_FILE, PREDICTIONS_FILE, MARKDOWN_FILE = "classification.json", "classification_predictions.jsonl", \
    "classification.md"


@dataclass
class ClassificationSet:
    """Cases to classify over ``names`` (with their ``texts``); ``labels[i]`` indexes case i's entry."""

    case_ids: list[str]
    queries: list[str]
    labels: np.ndarray  # [N] int
    names: list[str]
    texts: list[str]
    stats: dict


def classification_set(cases_path, knowledge, *, case_settings: CaseSettings | None = None,
                       on_error: str = "raise") -> ClassificationSet:
    """Read the cases against ``knowledge`` (``{name: text}`` or a knowledge file). Cases whose label is not
    in the knowledge base are counted in ``stats`` (with the first few ids), not classified."""
    if not isinstance(knowledge, dict):
        knowledge = read_knowledge(knowledge)
    result = read_cases(cases_path, knowledge=knowledge, settings=case_settings, on_error=on_error)
    if not result.records:
        raise HfembError("; ".join(result.summary_lines(knowledge)) + ": no case to classify")
    names = list(knowledge)
    index = {n: i for i, n in enumerate(names)}
    texts = [knowledge[n] for n in names]
    stats = {"path": str(cases_path), "rows": result.rows, "cases": len(result.records), "entries": len(names),
             "labels_used": len(set(result.labels)), "pairs": len(result.records) * len(names),
             "missing_label": len(result.missing_label),
             "first_missing": [{"case_id": c, "label": lab} for c, lab in result.missing_label[:5]],
             "skipped_rows": len(result.skipped), "first_skipped": str(result.skipped[0]) if result.skipped else None,
             "duplicate_entry_texts": len(texts) - len(set(texts))}
    return ClassificationSet([r.extra["case_id"] for r in result.records], [r.query for r in result.records],
                             np.array([index[lab] for lab in result.labels], dtype=np.int64), names, texts, stats)


def pool_rows(data: ClassificationSet) -> Iterator[dict]:
    """One labelled pool row per case: every knowledge entry, label 1 for the case's own."""
    for cid, query, label in zip(data.case_ids, data.queries, data.labels):
        documents = [{"content": t, "label": int(j == label)} for j, t in enumerate(data.texts)]
        yield {"query": query, "documents": documents, "case_id": cid, "label": data.names[label]}


def right_entry_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each case's own entry: the other entries scoring at least as high ([N, M] -> [N])."""
    own = scores[np.arange(len(labels)), labels]  # [N]
    return (scores >= own[:, None]).sum(axis=1) - 1


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1_accuracy": ..., "top5_accuracy": ...}``: share of cases whose own entry ranks within k."""
    ranks = right_entry_ranks(np.asarray(scores, dtype=np.float64), np.asarray(labels))
    return {f"top{k}_accuracy": float(np.mean(ranks < k)) for k in ks}


def classify(scores: np.ndarray, data: ClassificationSet, ks: Sequence[int] = (1, 5), *, show: int = 5,
             confusions: int = 10) -> tuple[dict, list[dict]]:
    """Accuracy summary and per-case predictions (top ``show`` entries) from ``scores`` [cases, entries]."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(data.queries), len(data.names)):
        raise ValueError(f"scores shape {scores.shape} != (cases, entries) {(len(data.queries), len(data.names))}")
    ranks = right_entry_ranks(scores, data.labels)
    own = np.zeros(scores.shape, dtype=np.int8)
    own[np.arange(len(data.labels)), data.labels] = 1
    index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((index, own, -scores), axis=-1)[:, :show]  # [N, show]; at equal score the own entry last
    wrong = Counter((data.names[lab], data.names[top[0]]) for lab, top, r in zip(data.labels, order, ranks) if r > 0)
    summary = {**{f"top{k}_accuracy": float(np.mean(ranks < k)) for k in ks},
               "mean_rank": float(np.mean(ranks + 1)), "cases": int(len(ranks)),
               "confusions": [{"label": a, "predicted": b, "cases": n} for (a, b), n in wrong.most_common(confusions)]}
    predictions = [{"case_id": cid, "label": data.names[lab], "rank": int(r + 1),
                    "top": [[data.names[j], round(float(scores[i, j]), 6)] for j in order[i]]}
                   for i, (cid, lab, r) in enumerate(zip(data.case_ids, data.labels, ranks))]
    return summary, predictions


def markdown(result: dict) -> str:
    ks = result["top_k"]
    lines = ["## Classification over the knowledge base", "",
             f"{result['data']['cases']} cases x {result['data']['entries']} knowledge entries "
             f"({result['data']['missing_label']} cases without their label in the knowledge base left out). "
             "Right at k: fewer than k other entries score at least as high as the case's own.", "",
             "| model | " + " | ".join(f"top-{k} accuracy" for k in ks) + " | mean rank |",
             "|---|" + "---|" * (len(ks) + 1)]
    for name, m in result["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[f'top{k}_accuracy']:.4f}" for k in ks)
                     + f" | {m['mean_rank']:.2f} |")
    for name, m in result["models"].items():
        if m["confusions"]:
            lines += ["", f"Most frequent confusions of {name} (label -> top-1 prediction): "
                      + "; ".join(f"{c['label']} -> {c['predicted']} ({c['cases']})" for c in m["confusions"][:5])]
    return "\n".join(lines) + "\n"


def evaluate_classification(models: dict[str, str], cases_path, knowledge, *, output_dir="eval_classification",
                            dev_cases=None, split_dev: float | None = None, case_settings: CaseSettings | None = None,
                            settings=None, top_k: Sequence[int] = (1, 5), thresholds="0.4:0.7",
                            print_table: bool = True, **options) -> dict:
    """Classify ``cases_path`` over ``knowledge`` (``{name: text}`` or a file) with each model.

    Returns evaluate()'s report with a ``classification`` section ({top_k, data, models: {name: {topK_accuracy,
    mean_rank, confusions}}}), also written to ``classification.json`` / ``.md``; per-case top-5 predictions go
    to ``classification_predictions.jsonl``. ``dev_cases`` (classified over the same knowledge) or
    ``split_dev`` choose the threshold of the sweep as in evaluate(). ``options`` are ``EvalSettings`` fields.
    """
    top_k = sorted({int(k) for k in top_k})
    if not top_k or top_k[0] < 1:
        raise ConfigError(f"top_k must be positive integers, got {top_k}")
    settings = settings or EvalSettings(thresholds=thresholds, **options)
    if not isinstance(knowledge, dict):
        knowledge = read_knowledge(knowledge)
    data = classification_set(cases_path, knowledge, case_settings=case_settings, on_error=settings.on_error)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / PAIRS_FILE, pool_rows(data))
    dev_file = None
    if dev_cases:
        dev = classification_set(dev_cases, knowledge, case_settings=case_settings, on_error=settings.on_error)
        write_jsonl(out / DEV_PAIRS_FILE, pool_rows(dev))
        dev_file = out / DEV_PAIRS_FILE
    pair_settings = dataclasses.replace(settings, data_format="pool", label_threshold=1)
    report = evaluate(models, out / PAIRS_FILE, dev_path=dev_file, split_dev=split_dev, output_dir=out,
                      settings=pair_settings, print_table=print_table)

    result = {"top_k": top_k, "data": data.stats, "rule": "right at k when fewer than k other entries score >= "
              "the case's own entry (cosine similarity)", "models": {}}
    with atomic_open(out / PREDICTIONS_FILE) as fh:
        for name, res in report["models"].items():
            encoded = encode_texts(res["model"], name, data.queries, data.texts, pair_settings)
            scores = encoded.queries.astype(np.float64) @ encoded.documents.astype(np.float64).T  # [N, M]
            summary, predictions = classify(scores, data, top_k)
            result["models"][name] = summary
            for row in predictions:
                fh.write(json.dumps({"model": name, **row}, ensure_ascii=False) + "\n")
    write_json(out / RESULT_FILE, result)
    text = markdown(result)
    with atomic_open(out / MARKDOWN_FILE) as fh:
        fh.write(text)
    if print_table:
        print(text)
    report["classification"] = result
    return report
