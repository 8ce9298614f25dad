"""`run_train.py CONFIG.json`: data → (mining) → model (+LoRA/QLoRA) → MultiNegEmbeddingTrainer → outputs.

The output folder gets ``adapter/`` (LoRA/QLoRA), ``merged/`` (a plain full model in the
sentence-transformers layout, no adapter files), checkpoints, ``train_log.jsonl`` (one line per logging
step), ``training_curves.png`` (``hfemb.publishing.plotting``), ``train_summary.json`` and TensorBoard logs.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import random
import time
from operator import itemgetter
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

import hfemb
from hfemb.data.beir import is_beir_folder
from hfemb.data.formats import read_records
from hfemb.data.records import ColumnMap, Record
from hfemb.data.splits import split_by_query
from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import check_output, save_atomically, write_json, write_jsonl
from hfemb.mining.mine import MiningConfig, mine
from hfemb.modeling.loading import format_instruction, load_embedding_model
from hfemb.publishing.hub import PUSH_KEYS, check_can_push, push_settings, push_training_output
from hfemb.publishing.plotting import plot_training_curves
from hfemb.training.arguments import EmbeddingTrainingArguments
from hfemb.training.averaging import (FIELD as AVERAGING_FIELD, CheckpointAveragingCallback, average_full_checkpoints,
                                      average_lora_checkpoints, averaging_k, averaging_record,
                                      checkpoints_to_average)
from hfemb.training.collator import MultiNegCollator
from hfemb.training.config import QWEN3_LORA_TARGETS, TrainConfig, TrainFileSpec, train_file_specs
from hfemb.training.distill import write_matryoshka_info
from hfemb.training.evaluator import build_evaluators, check_best_metric
from hfemb.training.merging import merge_adapter
from hfemb.training.outputs import write_model_cards
from hfemb.training.resume import (RunLossCallback, checkpoint_step, previous_loss_sum, remove_save_leftovers,
                                   resolve_resume, truncate_train_log, whole_run_loss)
from hfemb.training.redraw import REDRAW_KEY, RedrawnRows, mined_pools_spec, resample_spec
from hfemb.training.teacher_scores import row_teacher_scores
from hfemb.training.trainer import JsonlLogCallback, MultiNegEmbeddingTrainer

log = logging.getLogger("hfemb.training.runner")


# ---- data ------------------------------------------------------------------------------------
def rows_from_records(records: list[Record], num_negatives: int, seed: int, redraw: bool = True
                      ) -> tuple[list[dict], dict]:
    """Training rows ``{"query","positive","negatives","query_positives"}``, one per (query, positive)
    (``query_positives``: every positive of the query, shared by its rows; none counts as its negative).
    A record with exactly ``num_negatives`` negatives (a mined file) keeps them in order; one with more gets a
    seeded sample (as FlagEmbedding samples its ``neg`` lists); rows short of negatives are dropped and counted.
    A row that can draw other negatives in later epochs (mined pools, or a longer list) carries its
    `hfemb.training.redraw` spec under ``REDRAW_KEY`` (``redraw=False``: none, pools unread)."""
    rows, short, texts = [], 0, {}
    known: dict[str, list[str]] = {}  # query -> all its positives (records of one query may repeat it)
    for rec in records:
        known.setdefault(rec.query, [])
        known[rec.query].extend(p for p in rec.positives if p not in known[rec.query])
    for i, rec in enumerate(records):
        negs = rec.negatives
        if len(negs) < num_negatives:
            short += len(rec.positives)
            continue
        for j, pos in enumerate(rec.positives):
            picked = range(len(negs)) if len(negs) == num_negatives else \
                random.Random(f"{seed}/{i}/{j}").sample(range(len(negs)), num_negatives)  # = sample(negs, n)
            row = {"query": rec.query, "positive": pos, "negatives": [negs[k] for k in picked],
                   "query_positives": known[rec.query]}
            teacher = row_teacher_scores(rec.extra, rec.source, j, picked, len(rec.positives), len(negs))
            if teacher is not None:
                row["teacher_scores"] = teacher  # [1 + N] (hfemb mine --teacher, or FlagEmbedding's pos/neg_scores)
            if redraw and num_negatives:
                spec = mined_pools_spec(rec.extra, rec.source, negs, teacher is not None, known[rec.query], texts) \
                    if len(negs) == num_negatives else \
                    resample_spec(negs, num_negatives, rec.extra.get("neg_scores") if teacher is not None else None)
                if spec is not None:
                    row[REDRAW_KEY] = spec
            rows.append(row)
    return rows, {"rows": len(rows), "dropped_short_of_negatives": short}


def check_teacher_scores(rows: list[dict], cfg: TrainConfig, train_file: str | None = None) -> None:
    """Teacher scores on every training row or on none; an explicit ``loss.distill_weight`` needs them.
    ``train_file``: the file the rows come from (default ``data.train_file``)."""
    train_file = train_file or cfg.data.train_file
    with_scores = sum("teacher_scores" in r for r in rows)
    if 0 < with_scores < len(rows):
        raise ConfigError(f"{train_file}: {with_scores} of {len(rows)} training rows carry teacher scores "
                          "(pos_scores/neg_scores); give them for every row or for none")
    if cfg.loss.distill_loss == "mse" and with_scores:  # cosine targets: reranker logits would be silently wrong
        for line, row in enumerate(rows, 1):
            bad = next((x for x in row["teacher_scores"] if not -1.0 <= float(x) <= 1.0), None)
            if bad is not None:
                raise ConfigError(f"{train_file}: training row {line}: 'teacher_scores' (pos_scores/neg_scores) has "
                                  f"{bad}, outside [-1, 1]: loss.distill_loss=mse needs cosine similarities (e.g. "
                                  "`hfemb mine --teacher`); use distill_loss=kl for reranker scores")
    if cfg.loss.distill_weight and not with_scores:
        raise ConfigError(f"{cfg.source or 'config'}: 'loss.distill_weight' is {cfg.loss.distill_weight} but the "
                          f"rows of {train_file} carry no teacher scores (mine with `hfemb mine --teacher "
                          "MODEL`, or give FlagEmbedding's pos_scores/neg_scores)")


UNRANKED_FORMATS = ("pool", "pairs", "wikiqa", "case_candidates")  # labelled pools: their negatives are not selected yet


def needs_mining(records: list[Record], num_negatives: int, fmt: str = "") -> bool:
    """Mine when some record lacks negatives, or when they are a labelled pool's unranked negatives."""
    return num_negatives > 0 and (fmt in UNRANKED_FORMATS or any(len(r.negatives) < num_negatives for r in records))


def records_digest(records: list[Record]) -> str:
    """sha1 of the records as the miner receives them (every field, in order): whatever changed them --
    the file, ``data.format``, column settings, ``label_threshold``, skipped rows -- changes the digest."""
    h = hashlib.sha1()
    for rec in records:
        h.update(json.dumps(dataclasses.asdict(rec), sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def mine_cached(records: list[Record], source_file: str, mining: dict, num_negatives: int, cache_dir: Path) -> tuple[list[Record], dict]:
    """Mine ``records`` with `hfemb.mining.mine.mine`, cached on disk by (the records read from ``source_file``,
    mining settings): another ``data.format``, column mapping or ``label_threshold`` mines again."""
    settings = {**(mining or {}), "num_negatives": num_negatives}
    settings.setdefault("mode", "pool" if any(r.candidates for r in records) else "corpus")
    try:
        config = MiningConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"mining section: {exc}") from None
    key = hashlib.sha1(json.dumps([records_digest(records), dataclasses.asdict(config)], sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir / f"mined-{key}.jsonl"
    report_file = cache_dir / f"mined-{key}.report.json"
    if cached.exists() and report_file.exists():
        report = json.loads(report_file.read_text())
        report["cache"] = str(cached)
        return read_records(str(cached)).records, report
    result = mine(records, config)
    write_jsonl(cached, result.rows)
    write_json(report_file, result.report)
    return read_records(str(cached)).records, {**result.report, "cache": str(cached)}


def load_rows(cfg: TrainConfig, path: str, cache_dir: Path, report: dict, name: str,
              fmt: str | None = None) -> list[dict]:
    """The training rows of one file (``fmt``: its format, default ``data.format``), mined when needed; its
    report goes to ``report[name]``."""
    d = cfg.data
    columns = ColumnMap(query=list(d.query_columns), positive=d.positive_column) if d.query_columns else None
    result = read_records(path, fmt=fmt or d.format, columns=columns, on_error="skip" if d.skip_bad_rows else "raise",
                          label_threshold=d.label_threshold)
    records = result.records
    part: dict[str, Any] = {"file": path, "format": result.format, "records": len(records), "skipped_bad_rows": len(result.skipped)}
    mine_it = d.mine if d.mine is not None else needs_mining(records, d.num_negatives, result.format)
    if mine_it:
        records, part["mining"] = mine_cached(records, path, cfg.mining or {}, d.num_negatives, cache_dir)
    rows, counts = rows_from_records(records, d.num_negatives, int(cfg.training.get("seed", 42)),
                                     redraw=d.redraw_negatives and name != "eval")
    part.update(counts)
    report[name] = part
    if not rows:
        raise HfembError(f"{path}: no usable {name} rows (each needs a query, a positive and {d.num_negatives} negatives)")
    return rows


def dataset_query_prompt(spec: TrainFileSpec) -> str | None:
    """The query prompt of one dataset of ``data.train_files``: None = the model's own, "" = none (``""`` or
    false), else Qwen3-Embedding's ``Instruct: {task}\\nQuery:``."""
    if spec.instruction is None:
        return None
    return format_instruction(spec.instruction, "") if spec.instruction else ""


def load_train_datasets(cfg: TrainConfig, cache_dir: Path, report: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """``data.train_files``: each file read (and mined) on its own, its rows tagged with the dataset's index
    (``"dataset"``) and query prompt (``"query_prompt"``, `dataset_query_prompt`); with ``data.eval_ratio`` (and no
    ``data.eval_file``) a share of each dataset's queries is held out. Returns (train rows, held-out rows);
    ``report["train <name>"]`` describes each dataset."""
    rows: list[dict] = []
    held: list[dict] = []
    scored: dict[str, bool] = {}  # file -> its rows carry teacher scores (all or none: check_teacher_scores)
    for index, spec in enumerate(train_file_specs(cfg.data)):
        part = f"train {spec.name}"
        own = load_rows(cfg, spec.file, cache_dir, report, part, fmt=spec.format)
        check_teacher_scores(own, cfg, spec.file)
        scored[spec.file] = any("teacher_scores" in r for r in own)
        if len(set(scored.values())) > 1:  # batches of held-out rows mix datasets: all or none, before more mining
            raise ConfigError(f"data.train_files: teacher scores (pos_scores/neg_scores) in "
                              f"{', '.join(f for f, s in scored.items() if s)} but not in "
                              f"{', '.join(f for f, s in scored.items() if not s)}; give them for every dataset "
                              "or none")
        prompt = dataset_query_prompt(spec)
        own = [{**row, "dataset": index, "query_prompt": prompt} for row in own]
        if cfg.data.eval_ratio and not cfg.data.eval_file:
            try:
                out, own = split_by_query(own, cfg.data.eval_ratio, seed, query=itemgetter("query"))
            except HfembError as exc:
                raise HfembError(f"{spec.file} (data.train_files[{index}]): data.eval_ratio: {exc}") from None
            held.extend(out)
            report[part]["rows_after_eval_split"] = len(own)
        report[part].update({"name": spec.name, "weight": spec.weight, "query_prompt": prompt})
        rows.extend(own)
    return rows, held


# ---- model ------------------------------------------------------------------------------------
def resolve_dtype(cfg: TrainConfig) -> str:
    """Weights dtype to load. Full fine-tuning keeps fp32 master weights (AMP does the bf16/fp16 math);
    LoRA loads the frozen base in bf16/fp16 when training in that precision (adapters stay fp32);
    CPU always fp32."""
    import torch

    if cfg.model.torch_dtype != "auto":
        return cfg.model.torch_dtype
    if not torch.cuda.is_available() or cfg.model.finetune_type == "full":
        return "float32"
    if cfg.training.get("bf16"):
        return "bfloat16"
    if cfg.training.get("fp16"):
        return "float16"
    return "float32"


def check_hardware(cfg: TrainConfig) -> None:
    """Stop at once, before loading anything, when the config needs what this machine lacks."""
    import torch

    if cfg.model.finetune_type == "qlora":
        if not torch.cuda.is_available():
            raise HfembError(
                "finetune_type 'qlora' needs a CUDA GPU (bitsandbytes 4/8-bit kernels); this machine has none. "
                "Use finetune_type 'lora' or 'full' here, or run this config on a GPU machine."
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise HfembError("finetune_type 'qlora' needs bitsandbytes: pip install 'hfemb[qlora]'") from None
    if (cfg.training.get("bf16") or cfg.training.get("fp16")) and not torch.cuda.is_available() and not cfg.training.get("use_cpu"):
        if cfg.training.get("fp16"):
            raise HfembError("training.fp16 needs a CUDA GPU; on CPU set training.fp16=false (or use bf16)")
    if cfg.training.get("fp16") and "8b" in cfg.model.name_or_path.lower():
        log.warning("fp16 overflows on Qwen3-Embedding-8B activations; prefer training.bf16=true")


def lora_targets(backbone, requested) -> list[str] | str:
    if requested:
        return requested
    names = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
    found = [t for t in QWEN3_LORA_TARGETS if t in names]
    return found if len(found) == len(QWEN3_LORA_TARGETS) else "all-linear"


def build_model(cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    m = cfg.model
    model = load_embedding_model(
        m.name_or_path, pooling=m.pooling, query_instruction=m.query_instruction, symmetric=m.symmetric,
        torch_dtype=resolve_dtype(cfg), attn_implementation=m.attn_implementation,
        trust_remote_code=m.trust_remote_code, append_eos=m.append_eos, truncate_dim=m.truncate_dim,
        quantization=f"{m.quantization_bits}bit" if m.finetune_type == "qlora" else None,
        padding_free=m.padding_free,
    )
    if m.finetune_type in ("lora", "qlora"):
        if m.finetune_type == "qlora":
            from peft import prepare_model_for_kbit_training

            model.backbone = prepare_model_for_kbit_training(
                model.backbone, use_gradient_checkpointing=bool(cfg.training.get("gradient_checkpointing")),
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        lc = cfg.lora
        peft_config = LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
            target_modules=lora_targets(model.backbone, lc.target_modules), task_type="FEATURE_EXTRACTION",
        )
        model.backbone = get_peft_model(model.backbone, peft_config)
        if cfg.training.get("fp16") or cfg.training.get("bf16"):  # autocast runs the layers in half precision
            upcast_trainable_parameters(model)
    return model


def upcast_trainable_parameters(model) -> list[str]:
    """Trainable weights in fp32 (returns their names), for mixed-precision training (autocast computes in
    half precision whatever the weights' dtype): on an fp16/bf16 base, ``lora.bias: all|lora_only`` makes the
    base's own biases trainable in fp16, and GradScaler refuses fp16 gradients ("Attempting to unscale FP16
    gradients"); peft only keeps its adapter weights in fp32. Master weights belong in fp32 (as peft's
    ``cast_mixed_precision_params`` does)."""
    import torch

    upcast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            upcast.append(name)
    return upcast


def has_unused_trainable_parameters(model) -> bool:
    """Whether a forward and backward on one short text leaves some trainable weight without a gradient (DDP
    then needs ``find_unused_parameters``). Probed once on the model's device, with autograd.grad (no
    ``.grad`` is touched)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return False
    enc = model.tokenize(["probe text"], is_query=False, max_length=8)
    was_training = model.training
    model.train()
    try:
        emb = model(enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device))
        grads = torch.autograd.grad(emb.float().sum(), params, allow_unused=True)
    finally:
        model.train(was_training)
    return any(g is None for g in grads)


def training_arguments(cfg: TrainConfig, has_eval: bool) -> EmbeddingTrainingArguments:
    t = dict(cfg.training)
    if push_settings(t):  # hfemb pushes the final model itself (run_training); the Trainer never pushes
        check_can_push()
    for key in PUSH_KEYS:
        t.pop(key, None)
    if t.get("grad_cache_mini_batch") and (t.get("gradient_checkpointing") or t.get("activation_checkpointing")):
        log.warning("training.grad_cache_mini_batch with gradient checkpointing runs three forward passes per "
                    "mini-batch: GradCache already holds the activations of one mini-batch only; set "
                    "training.gradient_checkpointing=false unless one mini-batch does not fit without it")
    if "warmup_ratio" in t:  # transformers 5: a float < 1 in warmup_steps is a ratio
        ratio = t.pop("warmup_ratio")
        t.setdefault("warmup_steps", float(ratio) if ratio else 0)
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in t:
            t[new] = t.pop(old)
    if t.pop("group_by_length", False):
        t["train_sampling_strategy"] = "group_by_length"
    if t.get("activation_checkpointing"):
        t["activation_checkpointing_kwargs"] = {"use_reentrant": False, **(t.get("activation_checkpointing_kwargs") or {})}
    if t.get("report_to") == "auto":
        try:
            import tensorboard  # noqa: F401

            t["report_to"] = ["tensorboard"]
        except ImportError:
            t["report_to"] = "none"
    t["remove_unused_columns"] = False
    # DDP: the buffers (rotary inv_freq, position ids) are equal on every process: nothing to broadcast.
    # find_unused_parameters is decided on the model (`has_unused_trainable_parameters`, run_training).
    t.setdefault("ddp_broadcast_buffers", False)
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
        t.setdefault("use_cpu", True)  # torchrun on CPUs: transformers sets up DDP (gloo) only with use_cpu
        if t.get("deepspeed"):  # ... and DeepSpeed's own process group, which ZeRO-3's zero.Init reads
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
    t.setdefault("dataloader_pin_memory", torch.cuda.is_available())  # pinning without a GPU only warns
    if has_eval:
        # Defaults that agree with what the user set: evaluation follows the saving schedule (and the other way
        # round), and the best model is kept only when they match, as load_best_model_at_end requires.
        t.setdefault("eval_strategy", t.get("save_strategy", "epoch"))
        t.setdefault("save_strategy", t["eval_strategy"])
        if t["eval_strategy"] == "steps":
            t.setdefault("eval_steps", t.get("save_steps", 500))
        if t["save_strategy"] == "steps":
            t.setdefault("save_steps", t.get("eval_steps", 500))
        if "load_best_model_at_end" not in t and averaging_k(t):
            t["load_best_model_at_end"] = False  # the exported model is the average (hfemb.training.averaging)
        if "load_best_model_at_end" not in t:
            t["load_best_model_at_end"] = str(t["eval_strategy"]) == str(t["save_strategy"]) != "no" and (
                t["save_strategy"] != "steps" or _multiple(t["save_steps"], t["eval_steps"]))
            if not t["load_best_model_at_end"]:
                log.warning("training.save_strategy %r / eval_strategy %r do not match: hfemb's default "
                            "load_best_model_at_end=true is turned off (the final model is the last step's)",
                            t["save_strategy"], t["eval_strategy"])
        k = averaging_k(t)
        if not k:
            t.setdefault("metric_for_best_model", "eval_loss")
        elif t.get("metric_for_best_model") and t.get("save_total_limit") is not None and t["save_total_limit"] <= k:
            # the Trainer also keeps the best checkpoint: rotation could delete one of the last k
            raise ConfigError(f"'{AVERAGING_FIELD}' is {k} with training.metric_for_best_model set: the best "
                              f"checkpoint is kept besides the last {k}, so training.save_total_limit must be at least "
                              f"{k + 1} (or null), got {t['save_total_limit']}")
    else:
        t.setdefault("save_strategy", "epoch")
        if t.get("load_best_model_at_end"):
            raise ConfigError("training.load_best_model_at_end needs evaluation data (data.eval_file or data.eval_ratio)")
    try:
        (args,) = HfArgumentParser(EmbeddingTrainingArguments).parse_dict(t, allow_extra_keys=False)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"training section: {' '.join(str(exc).split())}") from None  # one line
    if averaging_k(t) and args.save_strategy == "no":  # e.g. following eval_strategy "no"
        raise ConfigError(f"'{AVERAGING_FIELD}' is {averaging_k(t)} but no checkpoints are saved (save_strategy "
                          "\"no\", following eval_strategy); set training.save_strategy to \"steps\" or \"epoch\"")
    return args


def _multiple(save_steps, eval_steps) -> bool:
    """save_steps is a whole multiple of eval_steps (what load_best_model_at_end needs); ratios must be equal."""
    if all(isinstance(v, (int, float)) and v >= 1 and float(v).is_integer() for v in (save_steps, eval_steps)):
        return int(save_steps) % int(eval_steps) == 0  # step counts (the config may give 6.0 for 6)
    return save_steps == eval_steps


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, MPS, XPU, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


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
    if cfg.data.eval_file and is_beir_folder(cfg.data.eval_file):
        eval_rows = []  # a retrieval set: metrics from the evaluator only, no eval loss
    elif cfg.data.eval_file:
        eval_rows = load_rows(cfg, cfg.data.eval_file, cache_dir, data_report, "eval")
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
                                passage_max_len=cfg.data.passage_max_len, num_negatives=cfg.data.num_negatives,
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
    if redraw and args.dataloader_num_workers and args.dataloader_persistent_workers:
        raise ConfigError("data.redraw_negatives: persistent dataloader workers keep the first epoch's copy of the "
                          "rows; set training.dataloader_persistent_workers=false or data.redraw_negatives=false")
    simans = cfg.data.redraw_sampling == "simans"
    if simans and not (redraw and any("teacher_scores" in r for r in rows)):
        raise ConfigError("data.redraw_sampling=simans weighs each row's pool by its teacher scores: the training "
                          "rows need them (hfemb mine --teacher) and data.redraw_negatives on, with mined pools")
    data_report["redraw_negatives"]["sampling"] = cfg.data.redraw_sampling
    trainer = MultiNegEmbeddingTrainer(
        model=model, args=args, train_dataset=RedrawnRows(rows, args.data_seed or args.seed,
                                                          cfg.data.redraw_simans_width if simans else None)
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
                             f"`hfemb merge {out} --output {out}/merged --overwrite`") from exc
    if main_process and cfg.loss.matryoshka_dims:  # after merging: merge_outputs writes merged/ anew
        for folder in ("merged", "adapter"):
            write_matryoshka_info(out / folder, cfg.loss.matryoshka_dims, cfg.loss.matryoshka_weights)
    summary["seconds"] = round(time.time() - started, 2)
    if main_process:
        write_json(out / "train_summary.json", summary)
        plot_curves(out)  # before the cards, which embed training_curves.png
        write_model_cards(out)
    push = push_settings(cfg.training)
    if push and main_process:
        try:
            summary["pushed_to"] = push_training_output(out, push)
        except HfembError as exc:
            raise HfembError(f"training finished and was saved to {out}, but the push failed: {exc}. Retry with "
                             f"`hfemb push {out} --repo-id {push.repo_id}`") from None
        write_json(out / "train_summary.json", summary)
    return summary


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
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    base_dtype = "auto" if cfg.model.finetune_type == "qlora" else resolve_dtype(cfg)
    if ds_config is not None:
        unset_hf_deepspeed_config()
    try:
        report = merge_adapter(out / "adapter", out / "merged", base_dtype=base_dtype,
                               merged_dtype=cfg.export.merged_dtype, texts=texts,
                               trust_remote_code=cfg.model.trust_remote_code)
    finally:
        if ds_config is not None:
            set_hf_deepspeed_config(ds_config)
    return report


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
