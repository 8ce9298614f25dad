"""`run_train.py CONFIG.json`: data → (mining) → model (+LoRA/QLoRA) → MultiNegEmbeddingTrainer → outputs.

The output folder gets ``adapter/`` (LoRA/QLoRA), ``merged/`` (a plain full model in the
sentence-transformers layout, no adapter files), checkpoints, ``train_log.jsonl`` (one line per logging
step), ``training_curves.png`` (``hfemb.publishing.plotting``), ``train_summary.json`` and TensorBoard logs.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from operator import itemgetter
from pathlib import Path
from typing import Any

import hfemb
from hfemb.data.beir import is_beir_folder
from hfemb.data.splits import split_by_query
from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import check_output, save_atomically, write_json
from hfemb.publishing.hub import push_settings, push_training_output
from hfemb.publishing.plotting import plot_training_curves
from hfemb.training.averaging import (CheckpointAveragingCallback, average_full_checkpoints, average_lora_checkpoints,
                                      averaging_k, averaging_record, checkpoints_to_average)
from hfemb.training.base_merge import choose_alpha_on_eval, merge_with_base
from hfemb.training.collator import MultiNegCollator
from hfemb.training.config import (POOL_NEGATIVES_AUTO, POOL_NEGATIVES_AUTO_SIMANS, TrainConfig, corpus_mined,
                                   resolved_base_merge_alpha, resolved_distill_weight, resolved_temperature,
                                   train_file_specs)
from hfemb.training.data_rows import check_teacher_scores, dataset_query_prompt, load_rows, load_train_datasets
from hfemb.training.distributed import deepspeed_config_off
from hfemb.training.distill import write_matryoshka_info
from hfemb.training.evaluator import build_evaluators, check_best_metric
from hfemb.training.merging import merge_adapter
from hfemb.training.outputs import write_model_cards
from hfemb.training.resume import (RunLossCallback, checkpoint_step, previous_loss_sum, remove_save_leftovers,
                                   resolve_resume, truncate_train_log, whole_run_loss)
from hfemb.training.redraw import REDRAW_KEY, RedrawnRows, simans_width_for
from hfemb.training.run_setup import (build_model, check_hardware, has_unused_trainable_parameters, resolve_dtype,
                                      training_arguments)
from hfemb.training.trainer import JsonlLogCallback, MultiNegEmbeddingTrainer

log = logging.getLogger("hfemb.training.runner")


# ---- the run ----------------------------------------------------------------------------------
def run_training(cfg: TrainConfig, resume: bool | str = False) -> dict[str, Any]:
    """Train as configured; returns the summary also written to ``train_summary.json``."""
    import torch
    from transformers import set_seed

    out = Path(cfg.training["output_dir"])
    specs = train_file_specs(cfg.data)
    multi = bool(cfg.data.train_files)  # several datasets: one dataset per step (hfemb.training.sampling)
    check_output(out, inputs=[*(spec.file for spec in specs), cfg.data.eval_file, *(cfg.data.eval_files or {}).values()],
                 option="training.output_dir", folder=True,
                 files=("train_log.jsonl", "train_summary.json"))  # before loading data or the model
    check_hardware(cfg)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    seed = int(cfg.training.get("seed", 42))
    set_seed(seed)

    data_report: dict[str, Any] = {}
    cache_dir = out / ".hfemb_cache"
    if multi:
        rows, held_out = load_train_datasets(cfg, cache_dir, data_report, seed)
    else:
        rows = load_rows(cfg, cfg.data.train_file, cache_dir, data_report, "train")
    negatives = len(rows[0]["negatives"])  # per row: data.num_negatives, or data.pool_negatives (all alike)
    if cfg.data.eval_file and is_beir_folder(cfg.data.eval_file):
        eval_rows = []  # a retrieval set: metrics from the evaluator only, no eval loss
    elif cfg.data.eval_file:
        eval_rows = load_rows(cfg, cfg.data.eval_file, cache_dir, data_report, "eval", negatives=negatives)
    elif multi:  # held out per dataset by load_train_datasets
        eval_rows = held_out
        if cfg.data.eval_ratio:
            data_report["eval"] = {"from": "eval_ratio", "ratio": cfg.data.eval_ratio, "rows": len(eval_rows)}
    else:
        eval_rows, rows = (split_by_query(rows, cfg.data.eval_ratio, seed, query=itemgetter("query"))
                           if cfg.data.eval_ratio else ([], rows))
        data_report["train"]["rows_after_eval_split"] = len(rows)
        data_report["eval"] = {"from": "eval_ratio", "ratio": cfg.data.eval_ratio, "rows": len(eval_rows)}
    eval_rows = [{k: v for k, v in r.items() if k != REDRAW_KEY} for r in eval_rows]  # (a hold-out: fixed)
    evaluators = build_evaluators(cfg, eval_rows)  # read before loading the model: bad eval data stops at once
    data_report["evaluators"] = [ev.describe() for ev in evaluators]
    check_best_metric(cfg, evaluators, with_loss=bool(eval_rows))

    resume_from = resolve_resume(out, resume)  # complete checkpoints only; skipped ones are named
    if not multi:  # (several datasets: checked per file by load_train_datasets)
        check_teacher_scores(rows, cfg)
    if len({len(r["negatives"]) for r in rows}) > 1:  # data.pool_negatives auto, pools in some files only
        per_file = ", ".join(f"{part['file']}: {part['pool_negatives'] or 'as mined'}"
                             for name, part in data_report.items() if name.startswith("train "))
        raise ConfigError(f"data.train_files: rows of {sorted({len(r['negatives']) for r in rows})} negatives "
                          f"(data.pool_negatives auto draws {POOL_NEGATIVES_AUTO} for files with pools, "
                          f"{POOL_NEGATIVES_AUTO_SIMANS} for rows drawn by SimANS; {per_file}); "
                          "set data.pool_negatives to one number for all of them")

    modes = [part.get("mined_mode") for part in train_parts(data_report)]
    temperature = resolved_temperature(cfg.loss, modes)
    taught = any("teacher_scores" in r for r in rows)
    distill = resolved_distill_weight(cfg.loss, taught, corpus_mined(modes))
    data_report["temperature"] = {"value": temperature, "auto": cfg.loss.temperature is None, "mined_modes": modes}
    data_report["distill_weight"] = {"value": distill, "auto": cfg.loss.distill_weight is None,
                                     "teacher_scores": taught}
    base_alpha = resolved_base_merge_alpha(cfg.export, modes)
    data_report["base_merge_alpha"] = {"value": base_alpha, "auto": cfg.export.base_merge_alpha is None
                                       and not cfg.export.base_merge_alphas}
    if isinstance(base_alpha, list) and not evaluators:
        raise ConfigError(f"{cfg.source or 'config'}: 'export.base_merge_alphas' are chosen from on the run's eval "
                          "set, and the run has none: set data.eval_file (or data.eval_ratio, data.eval_files) with "
                          "data.embedding_eval true")
    # the values in effect, so that the summary and the card record them (a list stays in base_merge_alphas: the
    # recorded config remains one `hfemb train` accepts)
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, temperature=temperature, distill_weight=distill),
                              export=cfg.export if isinstance(base_alpha, list)
                              else dataclasses.replace(cfg.export, base_merge_alpha=base_alpha))

    try:
        args = training_arguments(cfg, has_eval=bool(eval_rows) or bool(evaluators))  # first: under ZeRO-3 the model then loads into shards
        from transformers.integrations import get_reporting_integration_callbacks

        get_reporting_integration_callbacks(args.report_to)  # an unknown report_to fails here, not after loading
    except (ValueError, TypeError) as exc:  # TrainingArguments' own checks (report_to, strategies, ...)
        raise ConfigError(f"{cfg.source or 'config'}: section 'training': {exc}") from None
    model = build_model(cfg)
    if multi:  # each dataset's query prompt, saved by name (config_sentence_transformers.json "prompts")
        model.named_prompts.update({spec.name: model.query_prompt if prompt is None else prompt for spec, prompt
                                    in ((s, dataset_query_prompt(s)) for s in specs)})
    if args.ddp_find_unused_parameters is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.deepspeed:
        # transformers' default for a model that is not a PreTrainedModel is True: an extra pass over the graph
        # every step; only needed when some trainable weight gets no gradient (e.g. BERT's unused pooler)
        args.ddp_find_unused_parameters = has_unused_trainable_parameters(model)
    collator = MultiNegCollator(model=model, query_max_len=cfg.data.query_max_len,
                                passage_max_len=cfg.data.passage_max_len, num_negatives=negatives,
                                symmetric=cfg.model.symmetric)
    log_file = out / "train_log.jsonl"
    if resume_from and int(os.environ.get("RANK", "0")) == 0:  # steps logged after the checkpoint are run again
        truncate_train_log(log_file, checkpoint_step(resume_from))
    previous_loss = previous_loss_sum(resume_from)
    loss_callback = RunLossCallback(previous_loss[0] if previous_loss else None)
    k_average = averaging_k(cfg.training)
    averaging = CheckpointAveragingCallback(k_average, out, resume_from) if k_average else None
    lengths = [len(r["query"]) + len(r["positive"]) + sum(map(len, r["negatives"])) for r in rows]
    redraw = sum(REDRAW_KEY in r for r in rows)  # (none with data.redraw_negatives false: load_rows built no spec)
    data_report["redraw_negatives"] = {"rows": redraw, "of": len(rows)}
    data_report["negatives_per_row"] = negatives
    data_report["pool_negatives"] = max(part.get("pool_negatives", 0) for part in train_parts(data_report))  # 0: as mined
    if redraw and args.dataloader_num_workers and args.dataloader_persistent_workers:
        raise ConfigError("data.redraw_negatives: persistent dataloader workers keep the first epoch's copy of the "
                          "rows; set training.dataloader_persistent_workers=false or data.redraw_negatives=false")
    simans_width = simans_width_for(rows, cfg.data.redraw_sampling, cfg.data.redraw_simans_width)
    data_report["redraw_negatives"]["sampling"] = "uniform" if simans_width is None else "simans"
    trainer = MultiNegEmbeddingTrainer(
        model=model, args=args, train_dataset=RedrawnRows(rows, args.data_seed or args.seed, simans_width)
        if redraw else rows,
        eval_dataset=eval_rows or ([] if evaluators else None),
        data_collator=collator, loss_config=cfg.loss, train_lengths=lengths,
        callbacks=[JsonlLogCallback(str(log_file), fresh=not resume_from), loss_callback,
                   *([averaging] if averaging else [])],
        grad_cache_mini_batch=args.grad_cache_mini_batch, evaluators=evaluators,
        no_duplicate_queries=cfg.data.batch_sampler == "no_duplicate_queries",
        dataset_weights=[spec.weight for spec in specs] if multi else None,
    )
    loss_callback.trainer = trainer
    # ZeRO-3 parameters are shards: ds_numel is the full size
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    result = trainer.train(resume_from_checkpoint=resume_from)
    final_eval = trainer.evaluate() if eval_rows or evaluators else {}

    zero3 = zero3_enabled()
    if zero3:
        save_outputs_zero3(trainer, cfg, out)  # every process takes part in gathering the weights
    elif trainer.is_world_process_zero():
        save_outputs(trainer.model, cfg, out)
    if trainer.is_world_process_zero():
        remove_save_leftovers(out)  # of a run killed while saving
    train_metrics = dict(result.metrics)
    if resume_from:
        steps_this_run = trainer.state.global_step - checkpoint_step(resume_from)
        train_metrics["train_loss_this_run"] = train_metrics.get("train_loss")
        train_metrics["train_loss"] = whole_run_loss(result.training_loss, steps_this_run, previous_loss,
                                                     trainer.state.global_step)
    summary = {
        "config": cfg.to_dict(),
        "config_file": cfg.source,
        "data": data_report,
        "parameters": {"trainable": trainable, "total": total},
        "padding_free": bool(model.padding_free),  # model.padding_free as resolved for this model
        "train": train_metrics,  # train_loss: mean over all steps, across resumes (None if unknown)
        "global_step": trainer.state.global_step,
        "best_metric": trainer.state.best_metric,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "final_eval": final_eval,
        "resumed_from": resume_from,
        "seconds": None,
        "device": str(args.device),
        "versions": _versions(),
        "outputs": {k: str(out / k) for k in (("adapter", "merged") if cfg.model.finetune_type != "full" else ("merged",))},
    }

    main_process = trainer.is_world_process_zero()
    ds_config = args.hf_deepspeed_config if zero3 else None
    # free the trainer, the optimizer and the trained model (GPU memory) before merging on the CPU
    loss_callback.trainer = None  # RunLossCallback holds the trainer: it would survive the del
    del trainer, model, collator, loss_callback
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if main_process and averaging:
        try:
            summary["checkpoint_averaging"] = average_outputs(cfg, out, averaging.saved, k_average)
        except Exception as exc:  # noqa: BLE001 - the checkpoints are kept: say so
            # the summary is uploaded with the model: no absolute paths in it
            summary["checkpoint_averaging"] = {"k": k_average, "error": str(exc).replace(str(out), out.name)}
            write_json(out / "train_summary.json", summary)
            raise HfembError(f"training finished, but averaging the last {k_average} checkpoints failed: {exc} "
                             f"(the checkpoints are in {out}; merged/ is not the average)") from exc
    elif main_process and cfg.model.finetune_type != "full":
        probe = [r["query"] for r in rows[:4]] + [r["positive"] for r in rows[:4]]
        try:
            summary["merge"] = merge_outputs(cfg, out, probe, ds_config)
        except Exception as exc:  # noqa: BLE001 - the adapter is saved: say how to merge it later
            summary["merge"] = {"error": str(exc)}
            write_json(out / "train_summary.json", summary)
            raise HfembError(f"training finished and {out}/adapter was saved, but merging failed: {exc}. Retry with "
                             f"`hfemb merge {out} --output {out}/merged --overwrite`"
                             + (f", then interpolate it with the base with `hfemb merge-weights "
                                f"{retry_alpha_args(base_alpha, 1.0)}`" if base_alpha != 1 else "")) from exc
    base_merge_failed, chosen_on, states = None, None, None
    alpha = 1.0 if isinstance(base_alpha, list) else base_alpha
    if main_process and isinstance(base_alpha, list):  # of the final weights, on this process alone
        try:
            chosen_on, states = choose_alpha_on_eval(cfg, out, base_alpha, evaluators, str(args.device), ds_config)
            alpha = chosen_on["chosen"]
            summary["base_merge"] = {"alpha": alpha, "chosen_on": chosen_on}  # (alpha 1: merged/ as trained)
        except Exception as exc:  # noqa: BLE001 - merged/ is still the trained model: finish, then say so
            summary["base_merge"] = {"alpha": base_alpha, "error": str(exc).replace(str(out), out.name)}
            base_merge_failed = exc
    if alpha == 1:
        states = None  # (alpha 1 won: nothing to merge, free them)
    if main_process and alpha < 1:  # after the LoRA merge or the checkpoint average: of the final weights
        try:
            summary["base_merge"] = merge_with_base(cfg, out, alpha, ds_config, chosen_on, states)
        except Exception as exc:  # noqa: BLE001 - merged/ is still the trained model: finish, then say so
            summary["base_merge"] = {"alpha": alpha, "error": str(exc).replace(str(out), out.name),
                                     **({"chosen_on": chosen_on} if chosen_on else {})}
            base_merge_failed = exc
    if main_process and cfg.loss.matryoshka_dims:  # after merging: merge_outputs writes merged/ anew
        for folder in ("merged", "adapter"):
            write_matryoshka_info(out / folder, cfg.loss.matryoshka_dims, cfg.loss.matryoshka_weights)
    summary["seconds"] = round(time.time() - started, 2)
    if main_process:
        write_json(out / "train_summary.json", summary)
        plot_curves(out)  # before the cards, which embed training_curves.png
        write_model_cards(out)
    if base_merge_failed is not None:
        raise HfembError(f"training finished and {out}/merged holds the trained weights (its card says so), but "
                         f"interpolating them with the base failed: {base_merge_failed}. Retry with `hfemb "
                         f"merge-weights --base BASE_FOLDER --tuned {out}/merged {retry_alpha_args(base_alpha, alpha)} "
                         "--output OTHER_FOLDER` (BASE_FOLDER: the base saved as an embedding model, e.g. by "
                         "`hfemb merge` or save_pretrained of transformers' AutoModel)") from base_merge_failed
    push = push_settings(cfg.training)
    if push and main_process:
        try:
            summary["pushed_to"] = push_training_output(out, push)
        except HfembError as exc:
            raise HfembError(f"training finished and was saved to {out}, but the push failed: {exc}. Retry with "
                             f"`hfemb push {out} --repo-id {push.repo_id}`") from None
        write_json(out / "train_summary.json", summary)
    return summary


def retry_alpha_args(configured: float | list[float], chosen: float) -> str:
    """`hfemb merge-weights`' alpha arguments that redo a failed interpolation with the base."""
    if isinstance(configured, list) and chosen == 1:  # the choice itself failed
        return f"--alpha {' '.join(f'{a:g}' for a in configured)} --choose-on EVAL_FILE"
    return f"--alpha {chosen:g}"


def train_parts(data_report: dict) -> list[dict]:
    """The reports of the training files (``train``, or ``train NAME`` per dataset of ``data.train_files``)."""
    return [part for name, part in data_report.items() if name == "train" or name.startswith("train ")]


def plot_curves(out: Path) -> None:
    """``training_curves.png`` from ``train_log.jsonl``; a drawing failure only warns (the run is saved)."""
    try:
        plot_training_curves(out)
    except Exception as exc:  # noqa: BLE001 - never lose a finished training to a plot
        log.warning("could not draw %s/training_curves.png: %s (retry with `hfemb plot %s`)", out, exc, out)


def save_outputs(model, cfg: TrainConfig, out: Path) -> None:
    """``merged/`` (full fine-tuning) or ``adapter/`` (LoRA, QLoRA), written atomically; LoRA's ``merged/`` is
    written by `merge_outputs` once the trainer is freed."""
    save_atomically(lambda d: model.save_pretrained(d), out / ("merged" if cfg.model.finetune_type == "full" else "adapter"))


def merge_outputs(cfg: TrainConfig, out: Path, texts: list[str], ds_config=None) -> dict:
    """``merged/`` from ``adapter/``: the base reloaded on the CPU in the dtype it was trained in (QLoRA: the
    unquantized checkpoint's dtype), merged in fp32, stored in ``export.merged_dtype``
    (`hfemb.training.merging`). Returns the merge report for ``train_summary.json``. ``ds_config``: the
    DeepSpeed ZeRO-3 config to switch off while the base loads (whole, not into shards)."""
    base_dtype = "auto" if cfg.model.finetune_type == "qlora" else resolve_dtype(cfg)
    with deepspeed_config_off(ds_config):
        return merge_adapter(out / "adapter", out / "merged", base_dtype=base_dtype,
                             merged_dtype=cfg.export.merged_dtype, texts=texts,
                             trust_remote_code=cfg.model.trust_remote_code)


def average_outputs(cfg: TrainConfig, out: Path, saved_steps: list[int], k: int) -> dict:
    """``merged/`` = the fp32 mean of the last ``k`` checkpoints of this run (`hfemb.training.averaging`; LoRA:
    of each checkpoint merged onto the base, on the CPU). Returns the record for ``train_summary.json``."""
    folders = checkpoints_to_average(out, saved_steps, k)
    record = averaging_record(k, folders, lora=cfg.model.finetune_type != "full")
    if cfg.model.finetune_type == "full":
        record = average_full_checkpoints(folders, out / "merged", out / "merged", record)
    else:
        record = average_lora_checkpoints(
            folders, out / "merged", base_dtype="auto" if cfg.model.finetune_type == "qlora" else resolve_dtype(cfg),
            merged_dtype=cfg.export.merged_dtype, trust_remote_code=cfg.model.trust_remote_code, record=record)
    log.info("merged/ is the average of %s", ", ".join(record["checkpoints"]))
    return record


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def save_outputs_zero3(trainer, cfg: TrainConfig, out: Path) -> None:
    """``save_outputs`` under DeepSpeed ZeRO-3, where each process holds shards of the weights: every process
    calls ``Trainer.save_model``, which gathers the 16-bit weights (``stage3_gather_16bit_weights_on_model_save``)
    for the main process to write ``merged/`` (full) or ``adapter/`` (merged later by `merge_outputs`, on an
    unpartitioned base)."""
    import shutil

    target = out / ("merged" if cfg.model.finetune_type == "full" else "adapter")
    staging = out / f".{target.name}.gathered"
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    if not any((staging / name).exists() for name in weights):
        raise HfembError(f"ZeRO-3 saved no gathered weights in {staging}: set "
                         "stage3_gather_16bit_weights_on_model_save to true in the DeepSpeed config (as "
                         "configs/deepspeed/zero3.json does)")
    (staging / "training_args.bin").unlink(missing_ok=True)
    save_atomically(lambda d: shutil.copytree(staging, d, dirs_exist_ok=True), target)
    shutil.rmtree(staging, ignore_errors=True)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"hfemb": hfemb.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
