"""Report files of a corpus-retrieval evaluation: results.json, results.csv, results.md (written atomically)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from hfemb.evaluation.report import jsonable
from hfemb.evaluation.retrieval_metrics import RETRIEVAL_METRICS
from hfemb.io_utils import atomic_open, write_json

LABELS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10",
          "recall@100": "R@100", "map@100": "MAP@100"}


def _f(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _ci(pair) -> str:
    return f" [{_f(pair[0])}, {_f(pair[1])}]" if pair else ""


def metrics_table(report: dict) -> str:
    """One row per model: every retrieval metric (95% CI of nDCG@10 and MRR@10) and ΔnDCG@10 vs the first model."""
    first = report["reference_model"]
    head = ["model"] + [LABELS[m] for m in RETRIEVAL_METRICS] + [f"ΔnDCG@10 vs {first} [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for name, m in report["models"].items():
        r = m["retrieval"]
        cells = [name] + [_f(r[k]) + (_ci(r.get("ci", {}).get(k)) if k in ("ndcg@10", "mrr@10") else "")
                          for k in RETRIEVAL_METRICS]
        cells.append("–" if name == first else
                     f"{r.get('diff_vs_first', {}).get('ndcg@10', r['ndcg@10'] - report['models'][first]['retrieval']['ndcg@10']):+.4f}"
                     + _ci(r.get("diff_vs_first_ci", {}).get("ndcg@10")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def threshold_table(report: dict) -> str:
    sweep_k = report["settings"]["sweep_k"]
    first = report["reference_model"]
    on = next(iter(report["models"].values()))["threshold"]["chosen_on"]
    rule = "bagged best F1" if next(iter(report["models"].values()))["threshold"].get("threshold_rule") == "bagged" \
        else "best F1"
    head = ["model", f"threshold ({rule} on {on})", "F1 at threshold [95% CI]", "precision / recall",
            f"ΔF1 vs {first} [95% CI]", "best F1 on eval (at)"]
    lines = [f"Threshold sweep over each query's top {sweep_k}: a retrieved document with score >= threshold is "
             "predicted relevant; relevant documents not retrieved count as misses.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for name, m in report["models"].items():
        t = m["threshold"]
        lines.append("| " + " | ".join([
            name, _f(t["chosen_threshold"]), _f(t["f1_at_chosen"]) + _ci(t.get("f1_at_chosen_ci")),
            f"{_f(t['precision_at_chosen'], 3)} / {_f(t['recall_at_chosen'], 3)}",
            "–" if name == first else f"{t.get('f1_diff_vs_first', 0):+.4f}" + _ci(t.get("f1_diff_vs_first_ci")),
            f"{_f(t['best_f1'])} ({_f(t['best_threshold'], 3)})"]) + " |")
    return "\n".join(lines)


def verdict(report: dict) -> str:
    first = report["reference_model"]
    out = []
    for name, m in report["models"].items():
        ci = m["retrieval"].get("diff_vs_first_ci", {}).get("ndcg@10")
        if name == first or not ci:
            continue
        sure = "better than" if ci[0] > 0 else "worse than" if ci[1] < 0 else "not distinguishable from"
        out.append(f"- {name} is {sure} {first} on nDCG@10: {m['retrieval']['diff_vs_first']['ndcg@10']:+.4f}, "
                   f"95% CI {_ci(ci).strip()} (paired bootstrap over queries).")
    return "\n".join(out)


def markdown_report(report: dict) -> str:
    data, s = report["data"]["eval"], report["settings"]
    out = [f"# Retrieval evaluation on {data['path']}" + (f" ({data['split']})" if data.get("split") else ""), "",
           f"{data['queries']} queries searched over {data['documents']} documents (exact top-{s['top_k']} by "
           f"cosine similarity); relevant: {s['relevant']}. Conventions: {s['conventions']}.", "",
           metrics_table(report), "", verdict(report), "", threshold_table(report), ""]
    dev = report["data"].get("dev")
    if dev:
        out += [f"Thresholds were chosen on the dev set ({dev.get('part') or dev.get('split')}: {dev['queries']} "
                "queries) and F1 is measured on the eval queries at that threshold.", ""]
    else:
        out += ["No dev set: thresholds were chosen on the eval queries themselves (optimistic).", ""]
    out += ["## Models", "", "| model | spec | dim | texts encoded / cached | encode s | search ms/query (device) |",
            "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        out.append(f"| {name} | `{m['model']}` | {m['embedding_dim']} | {m['texts_encoded']} / {m['texts_from_cache']} "
                   f"| {m['encode_seconds']} | {m['search_ms_per_query']} ({m['search_device']}) |")
    if report.get("failed_models"):
        out += ["", "Skipped (failed): " + "; ".join(f"{k}: {v}" for k, v in report["failed_models"].items())]
    return "\n".join(out) + "\n"


def write_csv(report: dict, path: Path) -> None:
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", *RETRIEVAL_METRICS, "chosen_threshold", "f1_at_chosen"])
        for name, m in report["models"].items():
            writer.writerow([name, *(f"{m['retrieval'][k]:.6f}" for k in RETRIEVAL_METRICS),
                             f"{m['threshold']['chosen_threshold']:.6f}", f"{m['threshold']['f1_at_chosen']:.6f}"])


def write_retrieval_report(report: dict, output_dir) -> str:
    """results.json, results.csv and results.md in ``output_dir``; returns the Markdown."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report["files"] = ["results.json", "results.csv", "results.md"]
    write_csv(report, output_dir / "results.csv")
    markdown = markdown_report(report)
    with atomic_open(output_dir / "results.md") as fh:
        fh.write(markdown)
    write_json(output_dir / "results.json", jsonable(report))
    return markdown
