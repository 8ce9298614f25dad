"""`hfemb merge-weights --base B --tuned T --alpha A [--method linear|slerp] --output DIR`: interpolate a tuned
model with its base, per tensor in fp32 (LM-Cocktail; `hfemb.modeling.merge_weights`), and write its model card."""

from __future__ import annotations

import argparse

HELP = "interpolate a tuned model's weights with its base (linear or slerp, per tensor in fp32)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write (1 - ALPHA) * BASE + ALPHA * TUNED (or the spherical interpolation) to DIR, "
                          "per tensor in fp32, keeping TUNED's tokenizer, prompts and sentence-transformers files; "
                          "DIR/hfemb_merge.json records how and DIR/README.md is a new model card (`hfemb card DIR` "
                          "rewrites it). Both must be full models (a training output's merged/).")
    a = parser.add_argument
    a("--base", required=True, help="the base model folder")
    a("--tuned", required=True, help="the tuned model folder (or a training output with merged/)")
    a("--alpha", type=float, required=True, help="weight of the tuned model: 0 = base, 1 = tuned")
    a("--method", choices=("linear", "slerp"), default="linear", help="per-tensor interpolation")
    a("--output", required=True, metavar="DIR", help="folder for the merged model (written atomically)")


def run(args: argparse.Namespace) -> int:
    from hfemb.evaluation.encoders import resolve_model_path
    from hfemb.modeling.merge_weights import merge_weights
    from hfemb.publishing.model_card import write_model_card

    record = merge_weights(resolve_model_path(args.base), resolve_model_path(args.tuned), args.output,
                           args.alpha, args.method)
    write_model_card(args.output, eval_results=False)
    print(f"merged {record['tensors']} tensors ({record['method']}, alpha {record['alpha']:g}) -> {args.output}")
    return 0
