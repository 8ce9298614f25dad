"""``EmbeddingTrainingArguments``: transformers' ``TrainingArguments`` plus hfemb's own training fields; the
``training`` section of a config (``hfemb.training.config``) describes one, built by the runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class EmbeddingTrainingArguments(TrainingArguments):
    """A new hfemb training option is a field here (type-annotated, with a help text): the config loader checks
    it from the annotation and ``HfArgumentParser`` builds it, with no other code."""

    grad_cache_mini_batch: int | None = field(default=None, metadata={
        "help": "rows per forward pass with GradCache (hfemb.training.grad_cache); null or 0 = off"})
    average_checkpoints: int | None = field(default=None, metadata={
        "help": "export the per-tensor fp32 mean of the last k saved checkpoints (hfemb.training.averaging); "
                "null or 0 = off"})
