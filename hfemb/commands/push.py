"""`hfemb push OUTPUT_DIR --repo-id USER/NAME`: upload a trained model with a regenerated model card.

OUTPUT_DIR is a training output folder (its ``merged/``, or ``adapter/`` with ``--adapter-only``) or a model
folder. The token comes from ``HF_TOKEN`` or ``hf auth login``; it is never printed or written.
``--dry-run`` prints exactly what would be uploaded and uploads nothing.
"""

from __future__ import annotations

import argparse

HELP = "upload a trained model (with model card) to the Hugging Face Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("output_dir", metavar="OUTPUT_DIR", help="training output folder (merged/, adapter/) or a model folder")
    a("--repo-id", required=True, metavar="USER/NAME", help="target model repository (created if missing)")
    a("--private", action="store_true", help="create the repository as private (an existing repo keeps its setting)")
    a("--adapter-only", action="store_true", help="push the LoRA adapter (adapter/) instead of the merged model")
    a("--dry-run", action="store_true", help="print the files, sizes and target; upload nothing")
    a("--revision", default=None, metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    a("--commit-message", default=None, metavar="TEXT", help="commit message")
    a("--eval-results", default=None, metavar="RESULTS_JSON",
      help="results.json of run_eval.py for the card's evaluation table and threshold (default: OUTPUT_DIR/eval/, "
           "OUTPUT_DIR/../eval/, else the newest eval_output/results.json that names this model)")
    a("--eval-model", default=None, metavar="NAME", help="this model's name in --eval-results (default: matched by path)")


def run(args: argparse.Namespace) -> int:
    # lazy (numpy, scipy): not loaded for `hfemb push --help`
    from hfemb.publishing.hub import PushSettings, push

    settings = PushSettings(args.repo_id, private=True if args.private else None, revision=args.revision,
                            commit_message=args.commit_message)
    push(args.output_dir, settings, adapter_only=args.adapter_only, dry_run=args.dry_run,
         eval_results=args.eval_results, eval_model_name=args.eval_model)
    return 0
