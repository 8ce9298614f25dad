"""Training order without two rows of one query in a batch (``data.batch_sampler: no_duplicate_queries``).

One row per (query, positive) and a plain random order put sibling rows -- two positives of one query -- in
one batch, where each becomes an in-batch negative of the other. Like sentence-transformers'
``NoDuplicatesBatchSampler`` (and FlagEmbedding's one positive per query and step), `NoDuplicateQuerySampler`
shuffles, then greedily fills blocks of ``block_size`` rows with distinct queries. A block is what one
optimizer micro-step sees across all processes (``per_device_train_batch_size * world_size``: accelerate
deals consecutive batches to the processes in turn), so queries are also distinct across devices. Rows
that cannot fill a whole block (too many rows of a few queries) come last; the loss still masks sibling
positives there (`hfemb.training.loss.info_nce_loss`, by query id).
"""

from __future__ import annotations

from typing import Hashable, Iterator, Sequence

import torch


def no_duplicate_blocks(keys: Sequence[Hashable], order: list[int], block_size: int) -> tuple[list[list[int]], list[int]]:
    """``order`` regrouped into full blocks of ``block_size`` indices with distinct ``keys`` (greedy, in order),
    and the indices left over."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    remaining = dict.fromkeys(order)  # insertion-ordered set
    blocks: list[list[int]] = []
    while len(remaining) >= block_size:
        seen, block = set(), []
        for index in remaining:
            if keys[index] not in seen:
                seen.add(keys[index])
                block.append(index)
                if len(block) == block_size:
                    break
        if len(block) < block_size:
            break  # no full block of distinct queries is left
        blocks.append(block)
        for index in block:
            del remaining[index]
    return blocks, list(remaining)


class NoDuplicateQuerySampler(torch.utils.data.Sampler[int]):
    """Every index once per epoch; each consecutive run of ``block_size`` indices (from the start) has
    distinct ``queries`` while possible. Seeded: epoch ``e`` uses ``seed + e`` (``set_epoch``, called by the
    Trainer; otherwise each new iteration moves to the next epoch)."""

    def __init__(self, queries: Sequence[Hashable], block_size: int, seed: int = 0):
        self.queries, self.block_size, self.seed = list(queries), int(block_size), int(seed)
        self.epoch = 0
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.queries), generator=generator).tolist()
        blocks, rest = no_duplicate_blocks(self.queries, order, self.block_size)
        for block in blocks:
            yield from block
        yield from rest
