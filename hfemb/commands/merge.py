"""`hfemb merge ADAPTER --output DIR`: merge a LoRA adapter onto its (unquantized) base model.

DIR gets a plain full model in the sentence-transformers layout with no adapter files, plus a model card.
ADAPTER may be an adapter folder or a training output folder (its ``adapter/``).
"""

from __future__ import annotations

import argparse

from hfemb.errors import HfembError
from hfemb.io_utils import check_output
from hfemb.modeling.dtypes import DTYPES

HELP = "merge a LoRA adapter onto its base model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("adapter", metavar="ADAPTER", help="LoRA adapter folder (adapter_config.json) or training output folder")
    a("--output", required=True, metavar="DIR", help="folder for the merged model")
    a("--dtype", default="auto", choices=DTYPES,
      help="dtype to store the merged model in (the merge itself runs in fp32 on the CPU); auto = the base's "
           "dtype when the LoRA delta survives it (<= 1%% lost), else float32")
    a("--base-dtype", default="auto", choices=DTYPES,
      help="dtype the base was trained in (its weights are rounded to it before merging); auto = the "
           "checkpoint's own dtype")
    a("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    a("--trust-remote-code", action="store_true", help="allow the base model's custom code")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    # lazy (numpy, torch): not loaded for `hfemb merge --help`
    from hfemb.training.merging import merge_adapter
    from hfemb.publishing.model_card import write_model_card

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file() and (adapter / "adapter" / "adapter_config.json").is_file():
        adapter = adapter / "adapter"
    output = Path(args.output)
    if output.resolve() == adapter.resolve() or adapter.resolve() in output.resolve().parents:
        raise HfembError(f"--output {output} must not be the adapter folder or inside it")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise HfembError(f"--output {output} exists and is not empty; pass --overwrite to replace it")
    check_output(output.parent, option="--output", folder=True)  # writable, before loading the base model
    report = merge_adapter(adapter, output, base_dtype=args.base_dtype, merged_dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code)
    summary_dir = adapter.parent if (adapter.parent / "train_summary.json").is_file() else None
    write_model_card(output, output_dir=summary_dir, eval_results=False,
                     base_model=None if summary_dir else _base_of(adapter), finetune_type=None if summary_dir else "lora")
    error = report["merge_error"]
    print(f"merged {adapter} onto its base -> {output} ({report['merged_dtype']}; merge error "
          f"{'n/a' if error is None else f'{100 * error:.3g}%'} of the adapter's shift from the base)")
    return 0


def _base_of(adapter) -> str | None:
    import json

    return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
