"""`hfemb` command line: one subcommand per module in ``hfemb/commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only for the subcommand that runs, so ``hfemb --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hfemb import __version__
from hfemb.errors import HfembError
from hfemb.io_utils import Terminated, handle_sigterm

# name -> (module, one-line help); kept here so `hfemb --help` needs no heavy import.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("hfemb.commands.convert", "convert training data between formats (hfemb, FlagEmbedding, ms-swift)"),
    "mine": ("hfemb.commands.mine", "mine hard/easy negatives by BM25 (jieba for Chinese), an embedding model, or both"),
    "train": ("hfemb.commands.train", "fine-tune an embedding model from a JSON config (= run_train.py)"),
    "eval": ("hfemb.commands.eval", "threshold-sweep F1 evaluation of several models (= run_eval.py)"),
    "split": ("hfemb.commands.split", "split a labelled eval file into dev/test by query"),
    "merge": ("hfemb.commands.merge", "merge a LoRA adapter onto its base model"),
    "merge-weights": ("hfemb.commands.merge_weights",
                      "interpolate a tuned model's weights with its base (linear or slerp, per tensor in fp32)"),
    "push": ("hfemb.commands.push", "upload a trained model (with model card) to the Hugging Face Hub"),
    "serve": ("hfemb.commands.serve", "serve a model as an OpenAI-compatible /v1/embeddings endpoint"),
    "card": ("hfemb.commands.card", "write the model cards of a training output, with its evaluation results"),
    "plot": ("hfemb.commands.plot", "draw training curves from a run's train_log.jsonl"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only when it says something and the help text does not already mention one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _available() -> dict[str, tuple[str, str]]:
    return {n: v for n, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfemb",
        description="Fine-tune text-embedding models: mine negatives, train, evaluate, export.",
    )
    parser.add_argument("--version", action="version", version=f"hfemb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module_name, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        if name == wanted:  # import only the command that runs
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2

    handle_sigterm()  # SIGTERM cleans up like Ctrl-C: no temporary file is left behind
    try:
        return int(args._run(args) or 0)
    except HfembError as exc:
        print(f"hfemb {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
