"""GradCache: contrastive batches larger than memory (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"; sentence-transformers' ``Cached*Loss``, Tevatron's ``--grad_cache``).

One training step on B queries and B*G documents, with at most ``mini_batch`` rows in the model at a time:

1. embed every mini-batch without autograd graphs, recording the RNG state before each;
2. compute the loss on the full embedding matrices (cross-device gathering included) and its gradient
   with respect to the embeddings only -- cheap, [B, D] and [B*G, D];
3. re-run each mini-batch with graphs under its recorded RNG state (same dropout masks as in step 1)
   and back-propagate ``sum(embedding * cached_gradient)``: by the chain rule the parameter gradients
   add up to exactly the full-batch gradient.

Activation memory is that of one mini-batch; compute is one extra forward pass. Each mini-batch is
trimmed to its own longest row (columns that are padding in every row are dropped).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch


class RngState:
    """CPU and accelerator (CUDA, ...) random state at one moment, replayable later (as
    `torch.utils.checkpoint` does) so a re-run draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type not in ("cpu", "meta") else None
        self.device_state = _device_module(device).get_rng_state(device) if self.device is not None else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the global random state is restored afterwards."""
        devices = [self.device] if self.device is not None else []
        device_type = self.device.type if self.device is not None else None
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                _device_module(self.device).set_rng_state(self.device_state, self.device)
            yield


def _device_module(device: torch.device):
    return getattr(torch, device.type)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row ([n, T] -> [n, T'])."""
    keep = attention_mask.bool().any(dim=0)  # [T]
    if bool(keep.all()):
        return input_ids, attention_mask
    return input_ids[:, keep], attention_mask[:, keep]


def mini_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, size: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive row chunks of at most ``size`` rows, each trimmed of all-padding columns."""
    if size < 1:
        raise ValueError(f"mini-batch size must be >= 1, got {size}")
    return [trim_padding(input_ids[i:i + size], attention_mask[i:i + size])
            for i in range(0, input_ids.shape[0], size)]


def embed_without_graph(model, chunks: list[tuple[torch.Tensor, torch.Tensor]]
                        ) -> tuple[torch.Tensor, list[RngState]]:
    """Step 1: [sum n_k, D] embeddings of the chunks (no autograd graph) and the RNG state before each chunk."""
    reps, states = [], []
    with torch.no_grad():
        for ids, mask in chunks:
            states.append(RngState(ids.device))
            reps.append(model(ids, mask))
    return torch.cat(reps), states


def grad_cache_step(model, inputs: dict[str, torch.Tensor], loss_fn: Callable, mini_batch: int,
                    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward, *, scale: float = 1.0,
                    no_sync: Callable[[], ContextManager] | None = None):
    """One GradCache forward/backward on a `MultiNegCollator` batch; returns what ``loss_fn(q, d)`` returned
    (an object with a ``loss`` attribute, e.g. `hfemb.training.loss.LossOutput`), computed on the full batch.

    Parameter gradients accumulate into ``.grad`` as ``scale * d(loss)/d(params)``, as after
    ``backward(scale * loss)`` on the plain path. ``backward`` runs each mini-batch's surrogate backward
    (e.g. ``accelerator.backward`` for AMP loss scaling); ``no_sync`` (e.g. DDP's ``no_sync``) wraps every
    mini-batch but the last, so gradients are all-reduced once per step. ``model`` must be in the mode
    (train/eval) of the step: dropout masks are replayed from step 1.
    """
    query_chunks = mini_batches(inputs["query_input_ids"], inputs["query_attention_mask"], mini_batch)
    doc_chunks = mini_batches(inputs["doc_input_ids"], inputs["doc_attention_mask"], mini_batch)
    chunks = query_chunks + doc_chunks
    reps, states = embed_without_graph(model, chunks)  # [B + B*G, D]
    n_queries = inputs["query_input_ids"].shape[0]
    q = reps[:n_queries].detach().requires_grad_()  # [B, D]
    d = reps[n_queries:].detach().requires_grad_()  # [B*G, D]
    with torch.enable_grad():
        out = loss_fn(q, d)
        out.loss.backward()  # gradients w.r.t. the embeddings only (and the cross-process all-reduce)
    grads = torch.cat([q.grad, d.grad]).split([ids.shape[0] for ids, _ in chunks])  # per chunk [n_k, D]
    for k, ((ids, mask), state, grad) in enumerate(zip(chunks, states, grads)):
        last = k == len(chunks) - 1
        with state.replay(), (nullcontext() if last or no_sync is None else no_sync()):
            emb = model(ids, mask)  # [n_k, D], now with a graph
            backward(torch.sum(emb * grad) * scale)
    return out
