"""Padding-free (packed) batches for rotary decoders: the texts of a padded batch packed into rows with
``position_ids`` restarting at 0 for each text, and pooling per packed segment.

This is transformers' ``DataCollatorWithFlattening`` convention. With ``attention_mask=None`` and such
``position_ids``, transformers (`masking_utils.find_packed_sequence_indices`; 5.23 here) builds a
block-diagonal causal mask for sdpa and eager attention, so no token attends to another text;
FlashAttention-2/3 run their varlen kernels on the ``cu_seq_lens`` computed here (one row, no mask at all).
Rotary positions restart per text, which gives every text exactly the positions it has alone.

Rows: with a varlen kernel, every text goes into one row. With sdpa / eager the mask is materialised and
attention costs (row length)^2 per row whatever the mask, so texts are packed first-fit-decreasing into rows
of at most ``max(longest text, MIN_ROW_TOKENS)`` tokens: with the default floor of 0, both the attention
(rows x longest^2) and the linear layers (rows x longest) cost at most what the padded batch costs, usually
much less. A row's unused tail is filled by pad tokens forming their own segment (positions 0, 1, ...),
which attends only to itself and is never pooled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hfemb.errors import ConfigError

# Rotary-position decoders whose transformers implementation builds packed masks from position_ids
# (create_causal_mask / create_sliding_window_causal_mask) and passes position_ids to the rotary embedding.
PACKABLE_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen2", "qwen2_moe", "llama", "mistral", "mixtral")
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")  # sdpa/eager tested on CPU
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # cu_seqlens kernels: one row, no mask
MIN_ROW_TOKENS = 0  # sdpa/eager: a packed row may hold this many tokens even when every text is shorter
PADDING_FREE_VALUES = ("auto", True, False)


def parse_padding_free(value, where: str = "padding_free") -> bool | str:
    """``auto`` | true | false (also the strings ``"true"``/``"false"``; None = auto) -> "auto", True or False."""
    if value is None:
        return "auto"
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.lower()]
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where} must be auto, true or false, got {value!r}")


def packing_support(config) -> tuple[bool, str]:
    """Whether a backbone config can run packed batches, and if not why (one phrase)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE_MODEL_TYPES:
        return False, (f"model type {model_type!r} is not a rotary decoder hfemb packs "
                       f"({', '.join(PACKABLE_MODEL_TYPES)}); encoders and absolute-position models need padding")
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in PACKED_ATTENTION:
        return False, f"attention implementation {attention!r} does not support packed sequences"
    return True, ""


def resolve_padding_free(setting, config, where: str = "padding_free") -> bool:
    """``auto`` -> on exactly when `packing_support`; true on an unsupported model -> ConfigError."""
    setting = parse_padding_free(setting, where)
    supported, reason = packing_support(config)
    if setting == "auto":
        return supported
    if setting and not supported:
        raise ConfigError(f"{where}=true: {reason}")
    return bool(setting)


def is_varlen(config) -> bool:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return (getattr(config, "_attn_implementation", None) or "") in VARLEN_ATTENTION


def pack_rows(lengths: list[int], row_tokens: int | None) -> list[list[int]]:
    """Text indices grouped into rows of at most ``row_tokens`` tokens (None: all in one row), first fit in
    order of decreasing length (a text longer than ``row_tokens`` gets a row of its own)."""
    if row_tokens is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            free.append(row_tokens - lengths[i])
        else:
            rows[slot].append(i)
            free[slot] -= lengths[i]
    return rows


@dataclass
class PackedBatch:
    """A padded batch of B texts packed into [R, L]. ``source`` / ``dest``: flat indices of the N real
    tokens in the padded [B*T] and packed [R*L] layouts (text order, then token order); ``segment``: [N]
    text index of each token; ``first`` / ``last``: [B] flat packed index of each text's first / last token."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L], restarting at 0 for each text (and for a row's pad tail)
    source: torch.Tensor  # [N]
    dest: torch.Tensor  # [N]
    segment: torch.Tensor  # [N]
    first: torch.Tensor  # [B]
    last: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]
    flash_kwargs: dict  # cu_seq_lens_q/k, max_length_q/k for varlen kernels (one row only), else {}


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, pad_id: int, varlen: bool) -> PackedBatch:
    """[B, T] padded ids and mask (left or right padding; each row's real tokens contiguous) -> `PackedBatch`.
    ``varlen``: one row and FlashAttention varlen kwargs; else rows of `MIN_ROW_TOKENS` or the longest text."""
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1).tolist()  # one host sync, as the length chunks have
    b, t = mask.shape
    if min(lengths) < 1:
        raise ValueError("packing needs at least one real token per text")
    rows = pack_rows(lengths, None if varlen else max(max(lengths), MIN_ROW_TOKENS))
    width = max(sum(lengths[i] for i in row) for row in rows)
    dest, segment = [], []
    first, last = [0] * b, [0] * b
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            first[i], last[i] = r * width + offset, r * width + offset + lengths[i] - 1
            positions[r, offset:offset + lengths[i]] = torch.arange(lengths[i])
            offset += lengths[i]
        positions[r, offset:] = torch.arange(width - offset)  # the pad tail: a segment of its own
    for i in range(b):  # text order, as `source` below
        dest.append(torch.arange(first[i], last[i] + 1))
        segment.append(torch.full((lengths[i],), i, dtype=torch.long))
    device = input_ids.device
    source = mask.reshape(-1).nonzero().squeeze(1)  # [N] row-major: text 0's tokens, then text 1's ...
    dest_t = torch.cat(dest).to(device)
    packed = torch.full((len(rows) * width,), pad_id, dtype=input_ids.dtype, device=device)
    packed[dest_t] = input_ids.reshape(-1)[source]
    flash_kwargs = {}
    if varlen:
        cu = torch.tensor(sorted(first) + [width], dtype=torch.int32, device=device)  # one row: segment starts
        flash_kwargs = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths),
                        "max_length_k": max(lengths)}
    return PackedBatch(input_ids=packed.view(len(rows), width), position_ids=positions.to(device), source=source,
                       dest=dest_t, segment=torch.cat(segment).to(device), first=torch.tensor(first, device=device),
                       last=torch.tensor(last, device=device), lengths=torch.tensor(lengths, device=device),
                       flash_kwargs=flash_kwargs)


def pool_packed(hidden: torch.Tensor, packed: PackedBatch, pooling: str) -> torch.Tensor:
    """[R, L, H] hidden states of a `PackedBatch` -> [B, H] fp32: the last token of each text, its first
    token (``cls``), or the mean of its tokens."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # [R*L, H]
    if pooling == "last":
        return flat.index_select(0, packed.last).to(torch.float32)
    if pooling == "cls":
        return flat.index_select(0, packed.first).to(torch.float32)
    if pooling == "mean":
        tokens = flat.index_select(0, packed.dest).to(torch.float32)  # [N, H]
        sums = torch.zeros(packed.lengths.shape[0], flat.shape[1], dtype=torch.float32, device=flat.device)
        return sums.index_add(0, packed.segment, tokens) / packed.lengths.unsqueeze(1).to(torch.float32)
    raise ConfigError(f"unknown pooling {pooling!r}")


def packed_forward(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                   pad_id: int) -> torch.Tensor:
    """One backbone call on the packed batch -> [B, H] fp32 pooled (not normalised) embeddings."""
    packed = pack_batch(input_ids, attention_mask, pad_id=pad_id, varlen=is_varlen(backbone.config))
    # use_cache=False: transformers only reads packed position_ids when there is no KV cache
    out = backbone(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids,
                   use_cache=False, **packed.flash_kwargs)
    return pool_packed(out[0], packed, pooling)
