"""Set-up of a training run: hardware checks, the model (dtype, LoRA/QLoRA) and its TrainingArguments."""

from __future__ import annotations

import logging
import os

from transformers import HfArgumentParser

from hfemb.errors import ConfigError, HfembError
from hfemb.modeling.loading import load_embedding_model
from hfemb.publishing.hub import PUSH_KEYS, check_can_push, push_settings
from hfemb.training.arguments import EmbeddingTrainingArguments
from hfemb.training.averaging import FIELD as AVERAGING_FIELD, averaging_k
from hfemb.training.config import QWEN3_LORA_TARGETS, TrainConfig

log = logging.getLogger("hfemb.training.run_setup")


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
