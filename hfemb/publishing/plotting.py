"""Training curves: ``training_curves.png`` drawn from a run's ``train_log.jsonl``.

Six panels against the optimizer step (epochs on the top axis): learning rate, gradient norm (log scale),
train and eval loss, train and eval accuracy, eval cosine similarity of positives and negatives, and the
eval margin; plus a row for the evaluators' nDCG@10 / MRR@10 / Recall@10 / best F1 / ROC-AUC and the named
eval sets' when they were logged. Drawn at the end of training (``hfemb.training.runner.run_training``) and by ``hfemb plot OUTPUT_DIR``
for any run, also one still in progress: lines that are not JSON objects (a half-written last line) are
skipped and counted. A step logged twice (a resumed run re-logs the steps after its checkpoint) keeps its
last value; the evaluation after training (the best checkpoint reloaded) is drawn as a star.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hfemb.errors import DataError
from hfemb.io_utils import atomic_open

CURVES_FILE = "training_curves.png"
LOG_FILE = "train_log.jsonl"
SMOOTH_FROM = 40  # train series with more points get an exponential moving average over the faint raw line
MARKERS_UP_TO = 60  # series with at most this many points get point markers


@dataclass
class TrainLog:
    """The numeric series of a ``train_log.jsonl``."""

    path: str
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {step: value}
    epochs: dict[int, float] = field(default_factory=dict)  # step -> epoch
    final_eval: dict[str, float] = field(default_factory=dict)  # evaluation after training (best model)
    final_step: int | None = None
    finished: bool = False  # the end-of-training summary line was seen
    lines: int = 0
    unreadable: list[int] = field(default_factory=list)  # line numbers that are not JSON objects

    def points(self, metric: str) -> tuple[list[int], list[float]]:
        values = self.series.get(metric, {})
        steps = sorted(values)
        return steps, [values[s] for s in steps]

    @property
    def last_step(self) -> int | None:
        steps = [s for v in self.series.values() for s in v]
        return max(steps) if steps else None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_train_log(path) -> TrainLog:
    """Parse ``train_log.jsonl`` (rows of ``hfemb.training.trainer.JsonlLogCallback``)."""
    path = os.fspath(path)
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError("no training log (has the run logged its first step yet?)", path) from None
    log = TrainLog(path)
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        log.lines += 1
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or _number(row.get("step")) is None:
            log.unreadable.append(lineno)
            continue
        step = int(row["step"])
        if "train_runtime" in row:  # end-of-training summary line
            log.finished, log.final_step = True, step
            continue
        if "loss" in row:  # training goes on (a resumed run)
            log.finished, log.final_step = False, None
        if _number(row.get("epoch")) is not None:
            log.epochs[step] = float(row["epoch"])
        final = log.finished and step == log.final_step and any(k.startswith("eval_") for k in row)
        for key, value in row.items():
            value = _number(value)
            if value is None or key in ("step", "epoch"):
                continue
            if final:
                log.final_eval[key] = value
            else:
                log.series.setdefault(key, {})[step] = value
    return log


def _ema(values: list[float], points: int) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing) with a window of ~points/20."""
    alpha = 2.0 / (max(points / 20.0, 2.0) + 1.0)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _line(ax, log: TrainLog, metric: str, label: str, color: str, *, smooth: bool = False) -> bool:
    steps, values = log.points(metric)
    if not steps:
        return False
    marker = "o" if len(steps) <= MARKERS_UP_TO else None
    if smooth and len(steps) > SMOOTH_FROM:
        ax.plot(steps, values, color=color, lw=0.8, alpha=0.3)
        ax.plot(steps, _ema(values, len(steps)), color=color, lw=1.8, label=f"{label} (smoothed)")
    else:
        ax.plot(steps, values, color=color, lw=1.6, marker=marker, ms=3.5, label=label)
    if metric in log.final_eval and log.final_step is not None:
        ax.plot([log.final_step], [log.final_eval[metric]], "*", color=color, ms=13, mec="black", mew=0.7,
                label=f"{label} after training (best model): {log.final_eval[metric]:.4g}")
    return True


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.45", fontsize=10)


def _epoch_axis(ax, log: TrainLog) -> None:
    """Epochs on the top axis (interpolated from the logged step -> epoch pairs)."""
    import numpy as np

    pairs = sorted({0: 0.0, **log.epochs}.items())
    if len(pairs) < 2 or pairs[-1][1] <= 0:
        return
    steps, epochs = np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)
    epochs = np.maximum.accumulate(epochs)  # monotone for the inverse
    if np.any(np.diff(epochs) <= 0):  # keep strictly increasing points only
        keep = np.r_[True, np.diff(epochs) > 0]
        steps, epochs = steps[keep], epochs[keep]
    if len(steps) < 2:
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, steps, epochs),
                                               lambda e: np.interp(e, epochs, steps)))
    top.set_xlabel("epoch", fontsize=9)
    top.tick_params(labelsize=8)


def _log_scale(ax, values: list[float]) -> None:
    """Log y axis with plain numbers (0.5, 2, 100); minor ticks labelled at 2x, 3x, 5x (2x, 5x beyond 1.5
    decades, none beyond 3; all of them within half a decade)."""
    from matplotlib.ticker import FuncFormatter

    positive = [v for v in values if v > 0]
    if not positive:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):
        low, high = ax.get_ylim()
        decades = math.log10(high / low) if low > 0 else 10.0
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        shown = () if decades > 3 else (2, 5) if decades > 1.5 else (2, 3, 5)
        return f"{v:g}" if decades < 0.5 or mantissa in shown else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _scaled_axis(ax, values: list[float], label: str) -> None:
    """Plain tick numbers with the power of ten moved into the axis label (no offset text to collide)."""
    from matplotlib.ticker import FuncFormatter

    top = max((abs(v) for v in values), default=0.0)
    exponent = math.floor(math.log10(top)) if top > 0 else 0
    if -2 <= exponent <= 2:
        ax.set_ylabel(label)
        return
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 10 ** exponent:g}"))
    ax.set_ylabel(f"{label} (×1e{exponent})")


def _describe(log: TrainLog, output_dir: Path | None) -> str:
    parts = []
    summary_file = output_dir / "train_summary.json" if output_dir else None
    if summary_file is not None and summary_file.is_file() and log.finished:
        try:
            cfg = json.loads(summary_file.read_text(encoding="utf-8")).get("config") or {}
            model = cfg.get("model") or {}
            parts.append(f"{model.get('name_or_path')} ({model.get('finetune_type')})")
        except (OSError, ValueError, AttributeError):
            pass
    last = log.last_step
    epoch = log.epochs.get(last) if last is not None else None
    parts.append(f"{'finished' if log.finished else 'in progress'}: step {last}"
                 + (f", epoch {epoch:.2f}" if epoch is not None else ""))
    if log.unreadable:
        parts.append(f"{len(log.unreadable)} unreadable log line(s) skipped")
    return " · ".join(parts)


def log_path(source) -> Path:
    """``source/train_log.jsonl`` for a folder, else ``source`` itself."""
    source = Path(source)
    return source / LOG_FILE if source.is_dir() else source


def plot_training_curves(source, output=None, *, title: str | None = None, dpi: int = 110) -> Path:
    """Draw ``training_curves.png`` from ``source`` (a training output folder or its ``train_log.jsonl``);
    written atomically to ``output`` (default: beside the log). Returns the PNG path."""
    log_file = log_path(source)
    log = read_train_log(log_file)
    if not log.series and not log.final_eval:
        raise DataError("no logged values to plot yet", str(log_file))
    output = Path(output) if output else log_file.parent / CURVES_FILE
    fig = draw_training_curves(log, title=title, output_dir=log_file.parent, dpi=dpi)
    with atomic_open(output, "wb") as fh:
        fig.savefig(fh, format="png")
    return output


QUALITY_METRICS = ("ndcg@10", "mrr@10", "recall@10", "best_f1", "roc_auc")


def quality_series(log: TrainLog) -> list[tuple[str, list[tuple[str, str]]]]:
    """Panels of the evaluators' metrics (``hfemb.training.evaluator``) when logged: the eval set's own
    (``eval_ndcg@10`` ...) and the named sets' nDCG@10 / best F1 (``eval_<name>_ndcg@10``: forgetting)."""
    own = [(f"eval_{m}", m) for m in QUALITY_METRICS if f"eval_{m}" in log.series]
    named = sorted((k, k[len("eval_"):]) for k in log.series for m in ("ndcg@10", "best_f1")
                   if k.endswith(f"_{m}") and k != f"eval_{m}" and k.startswith("eval_"))
    panels = []
    if own:
        panels.append(("Eval set: retrieval and F1 metrics", own))
    if named:
        panels.append(("Named eval sets (data.eval_files): watch for forgetting", named))
    return panels


def draw_training_curves(log: TrainLog, *, title: str | None = None, output_dir: Path | None = None,
                         dpi: int = 110):
    """The figure (a ``matplotlib.figure.Figure``, 3 x 2 panels; see the module docstring)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing kept alive
    from matplotlib.ticker import MaxNLocator

    output_dir = Path(output_dir) if output_dir else Path(log.path).parent
    quality = quality_series(log)
    fig = Figure(figsize=(13, 14.5 if quality else 11), dpi=dpi, layout="constrained")
    axes = fig.subplots(4 if quality else 3, 2, sharex=True)
    c_train, c_eval, c_neg = "tab:blue", "tab:orange", "tab:red"

    ax = axes[0, 0]
    ax.set_title("Learning rate")
    if not _line(ax, log, "learning_rate", "learning rate", c_train):
        _empty(ax, "not logged yet")
    _scaled_axis(ax, log.points("learning_rate")[1], "learning rate")

    ax = axes[0, 1]
    ax.set_title("Gradient norm (total L2, before clipping)")
    if _line(ax, log, "grad_norm", "gradient norm", c_train, smooth=True):
        _log_scale(ax, log.points("grad_norm")[1])
    else:
        _empty(ax, "not logged yet")
    ax.set_ylabel("L2 norm (log scale)")

    ax = axes[1, 0]
    ax.set_title("InfoNCE loss")
    drawn = _line(ax, log, "loss", "train loss", c_train, smooth=True)
    drawn = _line(ax, log, "eval_loss", "eval loss", c_eval) or drawn
    if not drawn:
        _empty(ax, "not logged yet")
    ax.set_ylabel("loss (nats per query)")

    ax = axes[1, 1]
    ax.set_title("Accuracy: positive ranked first among the batch's documents")
    drawn = _line(ax, log, "accuracy", "train accuracy", c_train, smooth=True)
    drawn = _line(ax, log, "eval_accuracy", "eval accuracy", c_eval) or drawn
    if not drawn:
        _empty(ax, "not logged yet")
    ax.set_ylabel("fraction of queries")
    ax.set_ylim(-0.02, 1.02)

    ax = axes[2, 0]
    ax.set_title("Eval cosine similarity to the query")
    drawn = _line(ax, log, "eval_positive_similarity", "positive", c_eval)
    drawn = _line(ax, log, "eval_negative_similarity", "negatives (mean)", c_neg) or drawn
    if not drawn:
        _empty(ax, "no evaluation yet")
    ax.set_ylabel("cosine similarity")

    ax = axes[2, 1]
    ax.set_title("Eval margin: cos(positive) − cos(hardest negative)")
    if _line(ax, log, "eval_margin", "margin", c_eval):
        ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    else:
        _empty(ax, "no evaluation yet")
    ax.set_ylabel("cosine difference")

    if quality:
        colors = ["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:olive"]
        for ax, (panel_title, keys) in zip(axes[3], quality):
            ax.set_title(panel_title)
            for i, (key, label) in enumerate(keys):
                _line(ax, log, key, label, colors[i % len(colors)])
            ax.set_ylabel("metric (higher is better)")
            ax.set_ylim(-0.02, 1.02)
        if len(quality) == 1:
            _empty(axes[3, 1], "no other eval set")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    last = max(log.last_step or 0, log.final_step or 0)
    axes[0, 0].set_xlim(0, max(last, 1) * 1.03)  # shared by every panel
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    for ax in axes[0]:
        _epoch_axis(ax, log)
    name = title or f"Training curves — {output_dir.resolve().name}"
    fig.suptitle(f"{name}\n{_describe(log, output_dir)}", fontsize=13)
    return fig
