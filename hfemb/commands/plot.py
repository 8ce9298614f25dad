"""`hfemb plot OUTPUT_DIR`: draw ``training_curves.png`` from a run's ``train_log.jsonl`` (also mid-run)."""

from __future__ import annotations

import argparse

from hfemb.errors import HfembError
from hfemb.publishing.plotting import log_path, plot_training_curves, read_train_log

HELP = "draw training curves from a run's train_log.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Draw training_curves.png (learning rate, gradient norm, train/eval loss, accuracy, eval similarity and "
        "margin against the optimizer step) from a training output folder's train_log.jsonl. Works on a run "
        "still in progress: a half-written last line is skipped.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="training output folder (or its train_log.jsonl)")
    parser.add_argument("--output", metavar="PNG", help="where to write the picture "
                                                        "(default: OUTPUT_DIR/training_curves.png)")
    parser.add_argument("--title", help="figure title (default: 'Training curves — <folder name>')")


def run(args) -> int:
    from pathlib import Path

    if not Path(args.output_dir).exists():
        raise HfembError(f"{args.output_dir}: no such folder (give a training output folder or its train_log.jsonl)")
    from hfemb.io_utils import check_output

    source = log_path(args.output_dir)
    check_output(args.output or source.parent / "training_curves.png", inputs=[source], option="--output")
    log = read_train_log(source)
    png = plot_training_curves(args.output_dir, args.output, title=args.title)
    state = "finished" if log.finished else "in progress"
    skipped = (f"; {len(log.unreadable)} unreadable line(s) skipped, lines {log.unreadable[:5]}"
               if log.unreadable else "")
    print(f"wrote {png} ({log.lines} log lines up to step {log.last_step}, {state}{skipped})")
    return 0
