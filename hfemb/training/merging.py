"""Merging a LoRA adapter onto its base in fp32 on the CPU, choosing the dtype ``merged/`` is stored in, and
measuring what the stored model lost against the adapter model.

Why fp32: a LoRA delta is small next to the weight it is added to (about 1 % of its norm after a typical
run), and bf16 keeps 8 significant bits (relative spacing 2^-8): rounding W + delta to bf16 throws away a
large share of the delta (16 % of the adapter's effect on the embeddings, measured in issue 13). So the base
is loaded in the dtype it was trained on (its bf16 values are the adapter's reference), upcast exactly to
fp32, the delta added in fp32, and the result stored in fp32 unless the delta survives the lower precision.

``merged_dtype``: ``auto`` = the base's dtype when storing in it loses at most ``MERGE_LOSS_LIMIT`` of the
LoRA delta (weight norm), else float32; or an explicit float32 | bfloat16 | float16.

The merge error: embeddings of a few texts (as queries and as documents) from the stored merged model,
computed in fp32 from its stored values, versus the adapter model's on the same (dtype-rounded) base:
``mean ||e_merged - e_adapter|| / mean ||e_adapter - e_base||``, i.e. the share of the adapter's shift from
the base that the stored model does not reproduce. Logged as a warning above ``MERGE_LOSS_LIMIT``.

Memory: the merge holds the model in fp32 on the CPU (4 bytes per parameter: ~2.4 GB for
Qwen3-Embedding-0.6B, ~32 GB for the 8B); no GPU memory and no second copy of the model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from hfemb.errors import HfembError
from hfemb.modeling.loading import load_embedding_model
from hfemb.io_utils import save_atomically
from hfemb.modeling.dtypes import DTYPES
from hfemb.training.outputs import base_quantization

log = logging.getLogger("hfemb.training.merging")
MERGE_LOSS_LIMIT = 0.01  # 1 %: above this a lower-precision merged model warns (and auto keeps fp32)
PROBE_TEXTS = ["高血压患者日常饮食需要注意什么？", "What should I eat with high blood pressure?",
               "低盐饮食，多吃蔬菜水果，规律运动。", "Regular exercise and less salt lower blood pressure."]


def checkpoint_dtype(base: str) -> str:
    """The base checkpoint's own dtype (config.json ``dtype`` / ``torch_dtype``) when it is a float type, else fp32."""
    path = Path(base, "config.json")
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not config:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(base).to_dict()
        except (OSError, ValueError):
            config = {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return dtype if dtype in DTYPES[1:] else "float32"


def delta_lost_in(backbone, dtype: torch.dtype) -> float:
    """Share of the LoRA delta (Frobenius norm over every LoRA layer of an fp32 peft ``backbone``) that rounding
    the merged weights W + delta to ``dtype`` loses: ``||round(W + delta) - (W + delta)|| / ||delta||``."""
    from peft.tuners.lora import LoraLayer

    lost = total = 0.0
    with torch.no_grad():
        for module in backbone.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                delta = module.get_delta_weight(name).float()
                merged = module.get_base_layer().weight.float() + delta
                lost += float((merged.to(dtype).float() - merged).pow(2).sum())
                total += float(delta.pow(2).sum())
    return (lost ** 0.5) / (total ** 0.5) if total > 0 else 0.0


def _probe_embeddings(model, texts: list[str]) -> torch.Tensor:
    """[2n, D] fp32: the texts as queries, then as documents."""
    q = model.encode(texts, is_query=True, convert_to_numpy=False)
    d = model.encode(texts, is_query=False, convert_to_numpy=False)
    return torch.cat([q, d])


def merge_error(merged: torch.Tensor, adapter: torch.Tensor, base: torch.Tensor) -> dict:
    """``mean ||merged - adapter|| / mean ||adapter - base||`` over the rows (None when the adapter does not move
    the base at all), with both means."""
    error = float((merged - adapter).norm(dim=-1).mean())
    shift = float((adapter - base).norm(dim=-1).mean())
    return {"merge_error": error / shift if shift > 0 else None, "embedding_distance": error, "adapter_shift": shift}


def _cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters in place; buffers (rotary ``inv_freq``, recomputed in fp32 on
    every load) stay as they are."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)


def merge_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *, base_dtype: str = "auto",
                  merged_dtype: str = "auto", texts: list[str] | None = None, trust_remote_code: bool = False) -> dict:
    """Merge ``adapter_dir`` onto its base and save a plain model to ``output_dir`` (replaced atomically).

    ``base_dtype``: the dtype the base was trained in (its weights are rounded to it first, exactly as during
    training); ``auto`` = the checkpoint's own dtype. ``merged_dtype``: see the module docstring. ``texts``:
    the probe texts of the merge error (default `PROBE_TEXTS`). Returns the report recorded in
    ``train_summary.json``: base and stored dtypes, ``delta_lost_in_base_dtype`` and the merge error."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise HfembError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise HfembError(f"{cfg_file}: no 'base_model_name_or_path' to merge onto")
    if base_quantization(base, trust_remote_code):
        raise HfembError(f"{base}: the base model is quantized; merging into 4/8-bit weights loses precision. "
                         "Point the adapter at the unquantized base (adapter_config.json base_model_name_or_path).")
    for name, value in (("dtype", merged_dtype), ("base dtype", base_dtype)):
        if value not in DTYPES:
            raise HfembError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")
    if base_dtype == "auto":
        base_dtype = checkpoint_dtype(base)
    model = load_embedding_model(str(adapter_dir), torch_dtype=base_dtype, trust_remote_code=trust_remote_code,
                                 device="cpu")
    if not model.is_peft:
        raise HfembError(f"{adapter_dir}: the adapter did not load as a peft model")
    model.backbone.float()  # exact: every bf16/fp16 value is an fp32 value
    texts = list(texts or PROBE_TEXTS)
    with torch.no_grad():
        adapter_emb = _probe_embeddings(model, texts)
        with model.backbone.disable_adapter():
            base_emb = _probe_embeddings(model, texts)
    lost = delta_lost_in(model.backbone, getattr(torch, base_dtype))
    if merged_dtype == "auto":
        merged_dtype = base_dtype if base_dtype == "float32" or lost <= MERGE_LOSS_LIMIT else "float32"
    model.backbone = model.backbone.merge_and_unload()  # in place, in fp32: no second copy of the model
    _cast_parameters(model.backbone, getattr(torch, merged_dtype))
    save_atomically(lambda d: model.save_pretrained(d), output_dir)
    _cast_parameters(model.backbone, torch.float32)  # the stored (rounded) values, computed in fp32
    with torch.no_grad():
        report = merge_error(_probe_embeddings(model, texts), adapter_emb, base_emb)
    report = {"base_dtype": base_dtype, "merged_dtype": merged_dtype, "delta_lost_in_base_dtype": round(lost, 6),
              **report, "texts": len(texts)}
    if merged_dtype != "float32" and (report["merge_error"] or 0.0) > MERGE_LOSS_LIMIT:
        log.warning("%s: storing the merged model in %s loses %.1f%% of what the adapter changes in the "
                    "embeddings; use merged_dtype float32 (or auto)", output_dir, merged_dtype,
                    100 * report["merge_error"])
    return report
