"""Rank helpers and an autograd-aware all-gather for cross-device negatives.

Under data parallelism (torchrun / accelerate DDP, DeepSpeed) each process embeds its own B queries and
B*G documents. `gather_rows` concatenates the documents of every process (rank order) so each query is
scored against all of them, with gradients flowing back to the process that embedded each row.

Why no rescaling is needed: process r's loss is ``L_r = 1/B * sum_{i in r} l_i`` and the single-process
loss on the concatenated batch is ``L = 1/(W*B) * sum_i l_i``. The backward of `gather_rows` sums the
gradients every process sends for a row (an all-reduce), so a local document d gets
``sum_r dL_r/dd = 1/B * sum_i dl_i/dd``; DDP (and DeepSpeed) then *average* parameter gradients over the W
processes, giving ``1/(W*B) * sum_i dl_i/dd = dL/dd``: exactly the single-process gradient (factor 1;
tested with 2 gloo processes in tests/training/test_distributed.py). A backward that kept only the local rows'
own-loss gradient (no sum) would lose the other processes' terms; one that summed *and* averaged the
loss over all W*B queries on every process would be W times too large.
"""

from __future__ import annotations

import contextlib
import copy

import torch


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one process is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def _row_counts(rows: int, device: torch.device) -> list[int]:
    """Number of rows each process holds (processes may hold different counts, e.g. a last short batch)."""
    import torch.distributed as dist

    mine = torch.tensor([rows], dtype=torch.long, device=device)
    counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, mine)
    return [int(c.item()) for c in counts]


def _all_gather_padded(tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[n_r, ...] on each process -> [sum(counts), ...], rank order (pads to the largest count for the collective)."""
    import torch.distributed as dist

    width = max(counts)
    padded = tensor.contiguous()
    if tensor.shape[0] < width:
        padded = torch.cat([padded, padded.new_zeros((width - tensor.shape[0], *tensor.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every process's gradient for the local rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, counts: list[int], rank_: int) -> torch.Tensor:
        ctx.counts, ctx.start = counts, sum(counts[:rank_])
        return _all_gather_padded(tensor, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = ctx.counts[dist.get_rank()]
        return grad[ctx.start:ctx.start + n], None, None


def gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of ``tensor`` ([n, ...]) from every process, concatenated in rank order ([sum n_r, ...]), and
    the offset of this process's rows in the result. Differentiable when ``tensor`` requires grad (see
    the module docstring for the gradient); a plain gather otherwise. Single process: ``(tensor, 0)``.
    Every process must call it (a collective)."""
    if not is_distributed():
        return tensor, 0
    counts = _row_counts(tensor.shape[0], tensor.device)
    start = sum(counts[:rank()])
    if tensor.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(tensor, counts, rank()), start
    return _all_gather_padded(tensor.detach(), counts), start


# ---- saving gathered weights (DeepSpeed ZeRO-3, FSDP) -------------------------------------------------
class _BackboneWithWeights:
    """A backbone whose ``save_pretrained`` writes the given weights instead of its own (which are empty
    shards under ZeRO-3); every other attribute is the backbone's."""

    def __init__(self, backbone, state_dict: dict):
        self._backbone, self._state_dict = backbone, state_dict

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def save_pretrained(self, save_directory, **kwargs):
        # transformers' and peft's save_pretrained both take the weights to write as ``state_dict``
        # (peft keeps the adapter's entries of it)
        return self._backbone.save_pretrained(save_directory, state_dict=self._state_dict, **kwargs)


def with_gathered_weights(model, state_dict: dict):
    """A shallow copy of an `hfemb.modeling.model.EmbeddingModel` whose ``save_pretrained`` (adapter or full
    model, not ``merged=True``) writes ``state_dict`` -- the full weights gathered from every process, keys
    as in ``model.state_dict()`` (``backbone.``...), e.g. from ``Trainer.save_model`` under ZeRO-3."""
    prefix = "backbone."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    view = copy.copy(model)
    view.__dict__["_modules"] = {k: v for k, v in model._modules.items() if k != "backbone"}
    view.__dict__["backbone"] = _BackboneWithWeights(model.backbone, state_dict)
    return view


@contextlib.contextmanager
def deepspeed_config_off(ds_config):
    """Switch transformers' global DeepSpeed ZeRO-3 config (``ds_config``; None: nothing to do) off for the block,
    so that a model loads whole on the CPU instead of into shards, and back on after it."""
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if ds_config is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(ds_config)
