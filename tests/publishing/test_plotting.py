"""Training curves: the log reader (repeated steps, the final evaluation, a half-written last line), the
drawn series equal the logged values, `hfemb plot` on a finished and an in-progress run. (run_training
drawing training_curves.png that the model cards embed: tests/data/test_cases.py::test_tcm_sd_config_trains_...)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hfemb.cli import main
from hfemb.errors import DataError
from hfemb.publishing.plotting import CURVES_FILE, draw_training_curves, plot_training_curves, read_train_log


def train_row(step, loss, grad, lr, acc, epoch=None):
    return {"step": step, "epoch": epoch if epoch is not None else step / 10, "loss": loss, "grad_norm": grad,
            "learning_rate": lr, "accuracy": acc}


def eval_row(step, loss, acc, margin, epoch=None):
    return {"step": step, "epoch": epoch if epoch is not None else step / 10, "eval_loss": loss,
            "eval_accuracy": acc, "eval_positive_similarity": 0.7, "eval_negative_similarity": 0.4,
            "eval_margin": margin, "eval_runtime": 1.5}


def write_log(folder: Path, rows, tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


FINISHED = [
    train_row(1, 4.0, 80.0, 1e-4, 0.1), train_row(2, 3.0, 40.0, 2e-4, 0.2),
    eval_row(2, 3.5, 0.25, -0.02),
    train_row(3, 2.5, 20.0, 1.5e-4, 0.3), train_row(4, 2.0, 10.0, 0.5e-4, 0.5),
    eval_row(4, 3.6, 0.3, 0.01),
    {"step": 4, "epoch": 0.4, "train_runtime": 10.0, "train_loss": 2.9, "total_flos": 0.0},
    eval_row(4, 3.5, 0.25, -0.02),  # after training: the best checkpoint (step 2) reloaded
]


def test_read_finished_log(tmp_path):
    log = read_train_log(write_log(tmp_path, FINISHED))
    assert log.finished and log.final_step == 4 and log.lines == 8 and log.unreadable == []
    assert log.points("loss") == ([1, 2, 3, 4], [4.0, 3.0, 2.5, 2.0])
    assert log.points("eval_loss") == ([2, 4], [3.5, 3.6])  # the final evaluation does not overwrite step 4
    assert log.final_eval["eval_loss"] == 3.5 and log.final_eval["eval_margin"] == -0.02
    assert "train_runtime" not in log.series and "train_loss" not in log.series
    assert log.epochs[3] == pytest.approx(0.3) and log.last_step == 4


def test_resumed_run_keeps_the_last_value_of_a_step_and_in_progress_line_is_skipped(tmp_path):
    rows = [train_row(1, 4.0, 8.0, 1e-4, 0.1), train_row(2, 3.0, 4.0, 1e-4, 0.2), train_row(3, 2.9, 4.0, 1e-4, 0.2),
            # resumed from checkpoint-2: step 3 is logged again
            train_row(3, 2.7, 3.0, 1e-4, 0.25), train_row(4, 2.2, 2.0, 1e-4, 0.3)]
    path = write_log(tmp_path, rows, tail='{"step": 5, "epoch": 0.5, "loss": 2.')
    log = read_train_log(path)
    assert log.points("loss") == ([1, 2, 3, 4], [4.0, 3.0, 2.7, 2.2])
    assert not log.finished and log.unreadable == [6] and log.lines == 6
    assert log.series.keys() == {"loss", "grad_norm", "learning_rate", "accuracy"}


def test_drawn_series_are_the_logged_values(tmp_path):
    write_log(tmp_path, FINISHED)
    fig = draw_training_curves(read_train_log(tmp_path / "train_log.jsonl"))
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    lr, grad = axes["Learning rate"], axes["Gradient norm (total L2, before clipping)"]
    loss = axes["InfoNCE loss"]
    acc = axes["Accuracy: positive ranked first among the batch's documents"]
    margin = axes["Eval margin: cos(positive) − cos(hardest negative)"]
    np.testing.assert_allclose(lr.lines[0].get_xydata(), [[1, 1e-4], [2, 2e-4], [3, 1.5e-4], [4, 0.5e-4]])
    assert lr.get_ylabel() == "learning rate (×1e-4)"
    assert grad.get_yscale() == "log"
    np.testing.assert_allclose(grad.lines[0].get_ydata(), [80, 40, 20, 10])
    by_label = {line.get_label(): line for line in loss.lines}
    np.testing.assert_allclose(by_label["train loss"].get_xydata(), [[1, 4.0], [2, 3.0], [3, 2.5], [4, 2.0]])
    np.testing.assert_allclose(by_label["eval loss"].get_xydata(), [[2, 3.5], [4, 3.6]])
    star = by_label["eval loss after training (best model): 3.5"]
    assert star.get_marker() == "*" and list(star.get_xydata()[0]) == [4, 3.5]
    np.testing.assert_allclose({l.get_label(): l for l in acc.lines}["eval accuracy"].get_ydata(), [0.25, 0.3])
    np.testing.assert_allclose(margin.lines[0].get_ydata(), [-0.02, 0.01])
    assert all(ax.get_xlabel() == "optimizer step" for ax in fig.axes if ax.get_title().startswith("Eval"))
    assert "finished: step 4, epoch 0.40" in fig._suptitle.get_text()


def test_many_points_are_smoothed_and_few_points_get_markers(tmp_path):
    rng = np.random.default_rng(0)
    rows = [train_row(s, 3.0 * np.exp(-s / 300) + rng.normal(0, 0.1), 1.0, 1e-5, 0.5) for s in range(1, 501)]
    fig = draw_training_curves(read_train_log(write_log(tmp_path, rows)))
    loss = next(ax for ax in fig.axes if ax.get_title() == "InfoNCE loss")
    raw, smooth = loss.lines[0], loss.lines[1]
    assert len(raw.get_xdata()) == 500 and smooth.get_label() == "train loss (smoothed)"
    assert np.std(np.diff(smooth.get_ydata())) < np.std(np.diff(raw.get_ydata())) / 5  # smoother
    few = draw_training_curves(read_train_log(write_log(tmp_path / "few", FINISHED[:2])))
    assert next(ax for ax in few.axes if ax.get_title() == "InfoNCE loss").lines[0].get_marker() == "o"


def test_plot_writes_png_atomically(tmp_path):
    write_log(tmp_path, FINISHED)
    png = plot_training_curves(tmp_path)
    assert png == tmp_path / CURVES_FILE
    from matplotlib.image import imread

    assert imread(str(png)).shape[:2] == (1210, 1430)  # 11 x 13 inches at 110 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl", CURVES_FILE]  # no temp file left


def test_plot_errors(tmp_path):
    with pytest.raises(DataError, match="no training log"):
        plot_training_curves(tmp_path)
    write_log(tmp_path, [], tail='{"step": 1, "loss"')
    with pytest.raises(DataError, match="no logged values to plot yet"):
        plot_training_curves(tmp_path)
    assert not (tmp_path / CURVES_FILE).exists()


def test_cli_plot_in_progress_run(tmp_path, capsys):
    write_log(tmp_path / "run", FINISHED[:4], tail='{"step": 4, "epo')
    assert main(["plot", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"wrote {tmp_path / 'run' / CURVES_FILE} (5 log lines up to step 3, in progress; "
                           "1 unreadable line(s) skipped, lines [5])")
    assert (tmp_path / "run" / CURVES_FILE).stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "run" / "train_log.jsonl"), "--output", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err

