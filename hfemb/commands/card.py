"""`hfemb card OUTPUT_DIR`: (re)write the model cards of a training output (or of a `hfemb merge-weights` output
folder), with its evaluation results."""

from __future__ import annotations

from pathlib import Path

from hfemb.io_utils import check_output

HELP = "write the model cards (README.md) of a training output, with its evaluation results"


def add_arguments(parser) -> None:
    parser.add_argument("output_dir", help="training output folder (with train_summary.json, merged/, adapter/), "
                                           "or a model folder written by `hfemb merge-weights`")
    parser.add_argument("--eval-results", default=None, metavar="RESULTS_JSON",
                        help="results.json of run_eval.py (default: OUTPUT_DIR/eval/, OUTPUT_DIR/../eval/, else the "
                             "newest eval_output/results.json that names this model)")
    parser.add_argument("--eval-model", default=None, metavar="NAME",
                        help="this model's name in the results (default: matched by path)")


def run(args) -> int:
    """(Re)write ``merged/README.md`` and ``adapter/README.md``; raises `HfembError` on bad input."""
    # lazy (numpy, scipy): not loaded for `hfemb card --help`
    from hfemb.publishing.card_sections import THRESHOLD_FILE
    from hfemb.publishing.model_card import PROVENANCE_FILE, check_training_output, write_model_card

    if Path(args.output_dir, PROVENANCE_FILE).is_file():  # a `hfemb merge-weights` output: a model folder
        check_output(args.output_dir, inputs=[args.eval_results], option="card", folder=True,
                     files=("README.md", THRESHOLD_FILE))
        result = write_model_card(args.output_dir, eval_results=args.eval_results, eval_model_name=args.eval_model)
        print(f"wrote {Path(args.output_dir, 'README.md')}"
              + (f" (threshold {result.threshold['threshold']:.4f} from {result.eval_results_file})"
                 if result.threshold else " (no evaluation results found)"))
        return 0
    check_training_output(args.output_dir)
    for sub in ("merged", "adapter"):
        if Path(args.output_dir, sub).is_dir():
            check_output(Path(args.output_dir, sub), inputs=[args.eval_results], option="card", folder=True,
                         files=("README.md", THRESHOLD_FILE))
    for sub in ("merged", "adapter"):
        if Path(args.output_dir, sub).is_dir():
            result = write_model_card(Path(args.output_dir, sub), output_dir=args.output_dir,
                                      eval_results=args.eval_results, eval_model_name=args.eval_model)
            print(f"wrote {Path(args.output_dir, sub, 'README.md')}"
                  + (f" (threshold {result.threshold['threshold']:.4f} from {result.eval_results_file})"
                     if result.threshold else " (no evaluation results found)"))
    return 0
