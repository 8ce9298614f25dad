"""Evaluation report files: results.json, results.csv, results.md, f1_vs_threshold.png, pr_curves.png.

Every file is written to a temporary name and renamed (nothing half-written).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from hfemb.evaluation.metrics import pr_curve, threshold_sweep
from hfemb.io_utils import atomic_open, write_json

MAX_PLOT_POINTS = 4000


def _f(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _ci(pair, digits: int = 4) -> str:
    return f"[{_f(pair[0], digits)}, {_f(pair[1], digits)}]" if pair else ""


def _thr(t: float) -> str:
    return f"{t:g}"


def threshold_table(report: dict) -> str:
    """The headline table: F1 per threshold (rows) and model (columns)."""
    names = list(report["models"])
    thresholds = report["settings"]["thresholds"]
    lines = ["| threshold | " + " | ".join(f"{n} F1" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for i, t in enumerate(thresholds):
        cells = [_f(report["models"][n]["sweep"][i]["f1"]) for n in names]
        best = max(report["models"][n]["sweep"][i]["f1"] for n in names)
        cells = [f"**{c}**" if len(names) > 1 and report["models"][n]["sweep"][i]["f1"] == best else c
                 for c, n in zip(cells, names)]
        lines.append(f"| {_thr(t)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    models, first = report["models"], report["reference_model"]
    ranking = any(m.get("ranking") for m in models.values())
    on = next(iter(models.values()))["chosen_on"]
    head = ["model", f"threshold ({rule_words(next(iter(models.values())))} on {on}) [95% CI]", "F1 at threshold [95% CI]", "precision / recall",
            f"ΔF1 vs {first} [95% CI]", "best F1 on eval (at)", "ROC-AUC", "AP"]
    if ranking:
        head += ["MRR@10", "nDCG@10", "R@1", "R@5", "R@10"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for name, m in models.items():
        cells = [name, f"{_f(m['chosen_threshold'])} {_ci(m.get('chosen_threshold_ci'), 3)}",
                 f"{_f(m['f1_at_chosen'])} {_ci(m.get('f1_at_chosen_ci'))}",
                 f"{_f(m['precision_at_chosen'], 3)} / {_f(m['recall_at_chosen'], 3)}",
                 "–" if name == first else f"{m.get('f1_diff_vs_first', 0):+.4f} {_ci(m.get('f1_diff_vs_first_ci'))}",
                 f"{_f(m['best_f1'])} ({_f(m['best_threshold'], 3)})", _f(m["roc_auc"]), _f(m["average_precision"])]
        if ranking:
            r = m.get("ranking") or {}
            cells += [_f(r.get(k)) for k in ("mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rule_words(model: dict) -> str:
    """How a model's threshold was chosen, in a few words (``threshold_rule``; reports before it: the argmax)."""
    return "bagged best F1" if model.get("threshold_rule") == "bagged" else "best F1"


def deploy_choice(models: dict) -> tuple[str, str]:
    """The model to deploy and the set it was chosen on: the best F1 on the dev set (where its threshold was
    chosen) when every model has one -- never the eval (test) F1, which then stays an unbiased estimate --
    else the eval set's own F1 (optimistic)."""
    if all(m.get("dev") for m in models.values()):
        return max(models, key=lambda n: models[n]["dev"]["best_f1"]), "dev"
    return max(models, key=lambda n: models[n]["f1_at_chosen"]), "eval"


def verdict(report: dict) -> str:
    """Which model and threshold to deploy (chosen on dev, `deploy_choice`), and how sure that is (from the
    bootstrap intervals)."""
    models, first = report["models"], report["reference_model"]
    best_name, chosen_on = deploy_choice(models)
    m = models[best_name]
    on = "the dev set" if m["chosen_on"] == "dev" else "the eval set itself (no --dev: optimistic)"
    picked = (f"Chosen by its F1 on the dev set ({_f(m['dev']['best_f1'])}), as its threshold was; the eval F1 "
              "below is then an unbiased estimate." if chosen_on == "dev" else
              "Chosen by its F1 on the eval set itself (no --dev): an optimistic choice.")
    text = [f"**Deploy {best_name} at threshold {_f(m['chosen_threshold'], 3)}** ({rule_words(m)} on {on}"
            + (f"; 95% of query resamples choose {_f(m['chosen_threshold_ci'][0], 3)}–"
               f"{_f(m['chosen_threshold_ci'][1], 3)}" if m.get("chosen_threshold_ci") else "")
            + f"): eval F1 {_f(m['f1_at_chosen'])}"
            + (f", 95% CI {_ci(m['f1_at_chosen_ci'])}" if m.get("f1_at_chosen_ci") else "") + ". " + picked]
    for name, other in models.items():
        if name == first or not other.get("f1_diff_vs_first_ci"):
            continue
        lo, hi = other["f1_diff_vs_first_ci"]
        sure = ("better than" if lo > 0 else "worse than" if hi < 0 else "not distinguishable from")
        text.append(f"- {name} is {sure} {first}: ΔF1 {other['f1_diff_vs_first']:+.4f}, 95% CI {_ci((lo, hi))} "
                    "(paired bootstrap over queries).")
    return "\n".join(text)


def markdown_report(report: dict) -> str:
    data, settings = report["data"]["eval"], report["settings"]
    out = [f"# Evaluation on {data['path']}", "",
           f"{data['pairs']} pairs ({data['positive_pairs']} relevant: {report['settings']['relevant']}) over "
           f"{data['queries']} queries. Predicted positive: cosine similarity >= threshold.", "",
           threshold_table(report), "", "## Summary", "", summary_table(report), "", verdict(report), ""]
    if report["data"].get("dev"):
        dev = report["data"]["dev"]
        out += [f"Thresholds were chosen on the dev set {dev['path']} ({dev['pairs']} pairs, {dev['queries']} queries); "
                "F1 is measured on the eval set at that threshold.", ""]
    if next(iter(report["models"].values()), {}).get("threshold_rule") == "bagged":
        out += [f"Bagged best F1: the median of the best-F1 thresholds of {settings.get('threshold_bags')} resamples "
                "of the queries (steadier on new queries than the argmax of one noisy F1 curve).", ""]
    out += ["## Per threshold", "", "| model | threshold | precision | recall | F1 | accuracy | predicted positive |",
            "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for row in m["sweep"]:
            out.append(f"| {name} | {_thr(row['threshold'])} | {_f(row['precision'])} | {_f(row['recall'])} | "
                       f"{_f(row['f1'])} | {_f(row['accuracy'])} | {_f(row['positive_rate'])} |")
    out += ["", "## Models and prompts", "", "| model | spec | query prompt | document prompt | dim | "
            "texts encoded / cached | encode s |", "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        out.append(f"| {name} | `{m['model']}` | {_prompt(m['query_prompt'])} | {_prompt(m['document_prompt'])} | "
                   f"{m['embedding_dim']} | {m['texts_encoded']} / {m['texts_from_cache']} | {m['encode_seconds']} |")
    if report.get("failed_models"):
        out += ["", "Skipped (failed): " + "; ".join(f"{k}: {v}" for k, v in report["failed_models"].items())]
    notes = [f"instruction: {settings['instruction'] if settings['instruction'] is not None else 'each model default'}",
             f"symmetric: {settings['symmetric']}", f"max_length: {settings['max_length']}",
             f"bootstrap: {settings['n_bootstrap']} query resamples, seed {settings['seed']}"]
    if data.get("skipped_rows"):
        notes.append(f"skipped data rows: {data['skipped_rows']} (first: {data['first_skipped']})")
    if data.get("duplicate_pairs_dropped"):
        notes.append(f"duplicate pairs dropped: {data['duplicate_pairs_dropped']} "
                     f"({data['label_conflicts']} with conflicting labels, highest kept)")
    out += ["", "Settings: " + "; ".join(notes) + "."]
    return "\n".join(out) + "\n"


def _prompt(prompt: str) -> str:
    return "(none)" if not prompt else "`" + prompt.replace("\n", "\\n").replace("|", "\\|") + "`"


def write_csv(report: dict, path: Path) -> None:
    fields = ["model", "threshold", "precision", "recall", "f1", "accuracy", "positive_rate"]
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for name, m in report["models"].items():
            for row in m["sweep"]:
                writer.writerow([name] + [f"{row[k]:.6f}" if k != "threshold" else _thr(row[k]) for k in fields[1:]])


def _thin(*arrays):
    n = len(arrays[0])
    if n <= MAX_PLOT_POINTS:
        return arrays
    idx = np.unique(np.linspace(0, n - 1, MAX_PLOT_POINTS).astype(int))
    return tuple(a[idx] for a in arrays)


def write_plots(report: dict, eval_scores: dict, eval_labels: np.ndarray, output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lt = report["settings"]["label_threshold"]
    thresholds = report["settings"]["thresholds"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = {name: pr_curve(eval_labels, eval_scores[name], label_threshold=lt) for name in report["models"]}

    # F1 as a step function of the threshold, evaluated exactly on a dense grid spanning all scores
    lows = [float(np.min(s)) for s in eval_scores.values()] + [min(thresholds)]
    highs = [float(np.max(s)) for s in eval_scores.values()] + [max(thresholds)]
    pad = 0.03 * (max(highs) - min(lows) or 1.0)
    grid = np.linspace(min(lows) - pad, max(highs) + pad, 1500)

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.axvspan(min(thresholds), max(thresholds), color="0.93", zorder=0, label="swept thresholds")
    for i, (name, m) in enumerate(report["models"].items()):
        color = colors[i % len(colors)]
        f1 = [row["f1"] for row in threshold_sweep(eval_labels, eval_scores[name], grid, label_threshold=lt)]
        ax.plot(grid, f1, color=color, lw=1.6, label=name)
        ax.plot([r["threshold"] for r in m["sweep"]], [r["f1"] for r in m["sweep"]], "o", color=color, ms=4)
        ax.plot([m["chosen_threshold"]], [m["f1_at_chosen"]], "*", color=color, ms=15, mec="black", mew=0.8,
                label=f"{name}: chosen {m['chosen_threshold']:.3f} (F1 {m['f1_at_chosen']:.3f})")
    ax.set_xlabel("threshold (cosine similarity; score >= threshold is positive)")
    ax.set_ylabel("F1 on the eval set")
    on = next(iter(report["models"].values()))["chosen_on"]
    ax.set_title(f"F1 vs threshold (★ = threshold chosen on {on})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_xlim(grid[0], grid[-1])
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, output_dir / "f1_vs_threshold.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    for i, (name, m) in enumerate(report["models"].items()):
        color = colors[i % len(colors)]
        r, p = _thin(curves[name]["recall"], curves[name]["precision"])
        ax.plot(r, p, color=color, lw=1.6, drawstyle="steps-post", label=f"{name} (AP {m['average_precision']:.3f})")
        ax.plot([m["recall_at_chosen"]], [m["precision_at_chosen"]], "*", color=color, ms=14, mec="black", mew=0.8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall on the eval set (★ = chosen threshold)")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _save(fig, output_dir / "pr_curves.png")
    plt.close(fig)
    return ["f1_vs_threshold.png", "pr_curves.png"]


def _save(fig, path: Path) -> None:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")


def write_report(report: dict, output_dir, *, eval_scores: dict, eval_labels, plots: bool = True) -> str:
    """Write all report files into ``output_dir``; return the Markdown text."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = ["results.json", "results.csv", "results.md"]
    if plots:
        files += write_plots(report, eval_scores, np.asarray(eval_labels), output_dir)
    report["files"] = files
    write_csv(report, output_dir / "results.csv")
    markdown = markdown_report(report)
    with atomic_open(output_dir / "results.md") as fh:
        fh.write(markdown)
    write_json(output_dir / "results.json", jsonable(report))
    return markdown


def jsonable(obj):
    """NaN -> null, numpy scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
