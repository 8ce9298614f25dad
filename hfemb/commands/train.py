"""`hfemb train CONFIG.json [section.key=value ...]` (also `python run_train.py ...`)."""

from __future__ import annotations

import argparse
import json

from hfemb.errors import ConfigError

HELP = "fine-tune an embedding model from a JSON config (= run_train.py)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="JSON config with sections model, data, mining, lora, loss, training (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config values, e.g. training.learning_rate=2e-5 data.num_negatives=7 "
                        "(values are parsed as JSON when possible)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or with no value from the last checkpoint-* in training.output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (defaults filled in) and exit")


def run(args: argparse.Namespace) -> int:
    import logging

    # lazy (numpy, transformers): not loaded for `hfemb train --help`
    from hfemb.training.config import blame_override, load_config, parse_override

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # lazy (numpy, torch): not loaded for `hfemb train --help`
    from hfemb.training.runner import run_training

    try:
        summary = run_training(cfg, resume=args.resume)
    except ConfigError as exc:  # TrainingArguments' checks run here: name the override they are about
        raise blame_override(exc, str(cfg.source), [(o, *parse_override(o)[:2]) for o in args.overrides]) from None
    outs = ", ".join(f"{k}: {v}" for k, v in summary["outputs"].items())
    print(f"done in {summary['seconds']:.0f}s, {summary['global_step']} steps; {outs}")
    if summary.get("final_eval"):
        ev = summary["final_eval"]
        averaged = (summary.get("checkpoint_averaging") or {}).get("checkpoints")
        print(("eval (last step's model; merged/ is the mean of " + ", ".join(averaged) + "): " if averaged else
               "eval: ") + ", ".join(f"{k.removeprefix('eval_')}={v:.4f}" for k, v in ev.items()
                                   if isinstance(v, float) and not k.endswith(("runtime", "per_second"))))
    return 0
