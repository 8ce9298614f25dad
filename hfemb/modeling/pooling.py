"""Pooling (last token / mean / CLS) and length chunking of a batch: the tensor steps of `EmbeddingModel.forward`."""

from __future__ import annotations

import torch

from hfemb.errors import ConfigError

POOLINGS = ("last", "mean", "cls")
CHUNK_OVERHEAD_TOKENS = 64  # `length_chunks`: an extra forward call costs about as much as this many tokens


def length_chunks(lengths: list[int], overhead_tokens: int) -> list[list[int]]:
    """Row indices grouped into chunks of similar length, longest first, minimising the padded tokens
    computed: sum over chunks of (rows x longest row) + ``overhead_tokens`` per chunk (the fixed cost of
    one more forward call, in tokens). Exact by dynamic programming over the sorted lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ls = [max(int(lengths[i]), 1) for i in order]
    n = len(ls)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # last chunk = sorted rows i..j-1, its longest is ls[i]
            cost = best[i] + (j - i) * ls[i] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


# config attributes of position schemes where a row's result does not depend on where its first token sits
_RELATIVE_POSITION_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct",
                           "rotary_emb_base", "partial_rotary_factor", "alibi")


def length_chunking_is_exact(config, padding_side: str) -> bool:
    """Whether `EmbeddingModel.forward`'s length chunks give each row the embedding the padded batch gives it.
    Chunks drop columns that are padding in all of their rows. With right padding every row keeps its
    positions (0, 1, ...). With left padding a row's positions shift by a constant: exact for rotary/ALiBi
    (relative) positions, not for absolute position embeddings (gpt2, ...), which then run unchunked."""
    if padding_side == "right":
        return True
    config = text_config(config)
    if str(getattr(config, "position_embedding_type", "") or "") in ("rotary", "relative_key", "relative_key_query"):
        return True
    return any(getattr(config, key, None) not in (None, False) for key in _RELATIVE_POSITION_KEYS)

def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, H] hidden states, [B, T] mask -> [B, H] fp32. Works for left and right padding: the first
    and last real tokens are found from the mask (never from pad ids)."""
    mask = attention_mask.to(torch.bool)
    if pooling == "mean":
        summed = (hidden * mask.unsqueeze(-1).to(hidden.dtype)).sum(dim=1, dtype=torch.float32)  # [B, H]
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    if pooling == "last":
        index = torch.where(mask, positions, -1).max(dim=1).values.clamp(min=0)  # [B]
    elif pooling == "cls":
        index = mask.to(torch.int8).argmax(dim=1)  # first real token (argmax returns the first maximum)
    else:
        raise ConfigError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].to(torch.float32)


def text_config(config):
    """The text model's config (``get_text_config()`` of a multimodal config, else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
