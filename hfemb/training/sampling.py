"""Training order without two rows of one query in a batch (``data.batch_sampler: no_duplicate_queries``).

One row per (query, positive) and a plain random order put sibling rows -- two positives of one query -- in
one batch, where each becomes an in-batch negative of the other. Like sentence-transformers'
``NoDuplicatesBatchSampler`` (and FlagEmbedding's one positive per query and step), `NoDuplicateQuerySampler`
shuffles, then greedily fills blocks of ``block_size`` rows with distinct queries. A block is what one
optimizer micro-step sees across all processes (``per_device_train_batch_size * world_size``: accelerate
deals consecutive batches to the processes in turn), so queries are also distinct across devices. Rows
that cannot fill a whole block (too many rows of a few queries) come last; the loss still masks sibling
positives there (`hfemb.training.loss.info_nce_loss`, by query id).

Several datasets (``data.train_files``): `SameDatasetSampler` draws each block from one dataset (FlagEmbedding's
``same_dataset_within_batch``), so every micro-batch of every process holds rows of a single dataset and the
documents gathered across devices are that dataset's too. ``weight`` scales a dataset's number of blocks per
epoch (`dataset_block_counts`); the order is a pure function of (seed, epoch), so a resumed run replays it.
"""

from __future__ import annotations

import math
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


def dataset_block_counts(sizes: Sequence[int], weights: Sequence[float], block_size: int) -> list[int]:
    """Blocks each dataset gets per epoch: ``max(1, round(weight * rows / block_size))`` (half rounds up). With
    weight 1 an epoch sees about every row once; weight 2 twice (a fresh shuffle for the second pass); 0.5 a
    random half (another half each epoch)."""
    return [max(1, math.floor(w * n / block_size + 0.5)) for n, w in zip(sizes, weights)]


class _RowStream:
    """The rows of one dataset as an endless sequence of seeded shuffles, dealt out in blocks; rows passed over
    for a repeated query wait (in order) for the next block."""

    def __init__(self, members: list[int], generator: torch.Generator):
        self.members, self.generator = members, generator
        self.buffer: list[int] = []
        self.pending: list[int] = []

    def _next(self) -> int:
        if not self.buffer:
            order = torch.randperm(len(self.members), generator=self.generator).tolist()
            self.buffer = [self.members[i] for i in reversed(order)]  # popped from the end: in shuffled order
        return self.buffer.pop()

    def block(self, size: int, keys: Sequence[Hashable] | None) -> list[int]:
        """``size`` rows with distinct ``keys`` (waiting rows first); any rows when ``keys`` is None. Ends: with
        keys, the dataset has at least ``size`` distinct ones (`SameDatasetSampler` checks), so one more
        shuffle always completes the block."""
        block, seen, kept = [], set(), []
        for index in self.pending:
            if len(block) < size and (keys is None or keys[index] not in seen):
                block.append(index)
                seen.add(keys[index] if keys is not None else None)
            else:
                kept.append(index)
        while len(block) < size:
            index = self._next()
            if keys is None or keys[index] not in seen:
                block.append(index)
                seen.add(keys[index] if keys is not None else None)
            else:
                kept.append(index)
        self.pending = kept
        return block


class SameDatasetSampler(torch.utils.data.Sampler[int]):
    """Indices in blocks of ``block_size`` (``per_device_train_batch_size * world_size``: one optimizer
    micro-step across all processes), each block from one dataset (``datasets[i]``: the dataset of row i).

    Per epoch, dataset ``d`` gives exactly ``dataset_block_counts(...)[d]`` blocks, drawn from successive seeded
    shuffles of its rows; with ``queries`` (no_duplicate_queries) a block has distinct queries whenever the
    dataset has at least ``block_size`` of them (else it is filled in shuffled order; the loss masks sibling
    positives). The blocks of all datasets are then shuffled together. Epoch ``e`` uses ``seed + e``
    (``set_epoch``, called by the Trainer; otherwise each new iteration moves to the next epoch)."""

    def __init__(self, datasets: Sequence[int], block_size: int, weights: Sequence[float], seed: int = 0,
                 queries: Sequence[Hashable] | None = None):
        self.block_size, self.seed, self.epoch = int(block_size), int(seed), 0
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.members: list[list[int]] = [[] for _ in weights]
        for index, d in enumerate(datasets):
            self.members[d].append(index)
        if any(not m for m in self.members):
            raise ValueError(f"dataset {next(i for i, m in enumerate(self.members) if not m)} has no rows")
        self.counts = dataset_block_counts([len(m) for m in self.members], weights, self.block_size)
        keys = list(queries) if queries is not None else None
        self.keys = [keys if keys is not None and len({keys[i] for i in m}) >= self.block_size else None
                     for m in self.members]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return sum(self.counts) * self.block_size

    def blocks(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``(dataset, row indices)`` of each block of ``epoch``, in order."""
        generator = torch.Generator().manual_seed(self.seed + int(epoch))
        blocks = []
        for d, members in enumerate(self.members):
            stream = _RowStream(members, generator)
            blocks.extend((d, stream.block(self.block_size, self.keys[d])) for _ in range(self.counts[d]))
        order = torch.randperm(len(blocks), generator=generator).tolist()
        return [blocks[i] for i in order]

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for _, block in self.blocks(epoch):
            yield from block
