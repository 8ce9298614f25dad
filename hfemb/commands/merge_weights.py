"""`hfemb merge-weights --base B --tuned T --alpha A [A ...] [--choose-on DEV] [--method linear|slerp] --output DIR`:
interpolate a tuned model with its base, per tensor in fp32 (LM-Cocktail; `hfemb.modeling.merge_weights`), alpha
given or chosen on a dev set (`hfemb.training.base_merge_sweep`), and write its model card."""

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
    a("--alpha", type=float, nargs="+", required=True,
      help="weight of the tuned model: 0 = base, 1 = tuned; several with --choose-on")
    a("--choose-on", metavar="DEV",
      help="evaluate every --alpha on this dev set (labelled pools or pairs, a BEIR folder) and keep the best")
    a("--metric", help="what --choose-on maximises: best_f1 (default on pools), roc_auc, average_precision, "
                       "mrr@10, ndcg@10 (default on retrieval sets), ...")
    a("--device", help="device for --choose-on's evaluation (default: cuda when available, else cpu)")
    a("--truncate-dim", type=int, help="--choose-on: score at this Matryoshka dimension (as run_eval --truncate-dim)")
    a("--trust-remote-code", action="store_true", help="--choose-on: load the tuned model with its own code")
    a("--method", choices=("linear", "slerp"), default="linear", help="per-tensor interpolation")
    a("--output", required=True, metavar="DIR", help="folder for the merged model (written atomically)")


def run(args: argparse.Namespace) -> int:
    from hfemb.evaluation.encoders import resolve_model_path
    from hfemb.modeling.merge_weights import check_merge_output, merge_weights
    from hfemb.publishing.model_card import write_model_card

    from hfemb.errors import ConfigError

    base, tuned = resolve_model_path(args.base), resolve_model_path(args.tuned)
    if len(args.alpha) > 1 and not args.choose_on:
        raise ConfigError("several --alpha values need --choose-on DEV (the dev set that picks one)")
    if (args.metric or args.device or args.truncate_dim or args.trust_remote_code) and not args.choose_on:
        raise ConfigError("--metric, --device, --truncate-dim and --trust-remote-code apply to --choose-on only")
    check_merge_output(base, tuned, args.output)  # before minutes of scoring
    chosen_on, states = None, None
    if args.choose_on:
        from hfemb.training.base_merge_sweep import choose_alpha_on_dev

        chosen_on, states = choose_alpha_on_dev(base, tuned, args.choose_on, args.alpha, args.metric, args.method,
                                        args.device, truncate_dim=args.truncate_dim,
                                        trust_remote_code=args.trust_remote_code)
        for alpha, value in chosen_on["values"].items():
            print(f"alpha {alpha}: {chosen_on['metric']} {value:.4f} on {chosen_on['data']}")
    alpha = chosen_on["chosen"] if chosen_on else args.alpha[0]
    record = merge_weights(base, tuned, args.output, alpha, args.method, chosen_on=chosen_on, states=states)
    write_model_card(args.output, eval_results=False)
    print(f"merged {record['tensors']} tensors ({record['method']}, alpha {record['alpha']:g}"
          + (f", chosen on {chosen_on['data']} by {chosen_on['metric']}" if chosen_on else "") + f") -> {args.output}")
    return 0
