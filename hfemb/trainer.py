"""`MultiNegEmbeddingTrainer`: a `transformers.Trainer` for contrastive embedding training.

Each batch (from `hfemb.collator.MultiNegCollator`) holds B queries and, for each, its positive and N mined
negatives. Queries go through the model in one forward pass and all B*(1+N) documents in another; the
loss is `hfemb.loss.info_nce_loss`. Everything else -- AdamW, cosine schedule with warmup, weight-decay
groups that exclude biases and every norm weight (`Trainer.get_decay_parameter_names`), mixed precision,
gradient accumulation, checkpoints, best-model tracking, resuming -- is the stock Trainer's.

Gradient accumulation: the loss is a mean over the queries of a micro-batch and batches carry no
``labels`` key, so the Trainer divides it by the accumulation steps exactly once
(``loss_is_scaled_for_ga = False``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from hfemb.config import LossConfig
from hfemb.loss import info_nce_loss

# Columns of the per-query statistics returned by `prediction_step` (aggregated by `aggregate_eval_stats`).
STAT_COLUMNS = ("correct", "positive_similarity", "negative_similarity", "hardest_negative_similarity")


def per_query_stats(q: torch.Tensor, d: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-query [B, 4] statistics: positive ranked first (by the loss's logits), cos(q, positive),
    mean and max cos(q, negative) over the query's own mined negatives (over the other in-batch documents
    when it has none)."""
    b = q.shape[0]
    group = d.shape[0] // b
    q, d = q.float(), d.float()
    correct = (logits.argmax(dim=-1) == labels).float()  # [B]
    if group > 1:
        sims = torch.einsum("bd,bgd->bg", q, d.view(b, group, -1))  # [B, G]
        pos, neg = sims[:, 0], sims[:, 1:]  # [B], [B, N]
        neg_mean, neg_max = neg.mean(dim=1), neg.max(dim=1).values
    else:
        sims = q @ d.T  # [B, B]
        pos = sims.diagonal()
        if b > 1:
            off = sims.masked_fill(torch.eye(b, dtype=torch.bool, device=sims.device), float("nan"))
            neg_mean = off.nanmean(dim=1)
            neg_max = off.nan_to_num(nan=-2.0).max(dim=1).values
        else:
            neg_mean = neg_max = torch.full_like(pos, float("nan"))
    return torch.stack([correct, pos, neg_mean, neg_max], dim=1)  # [B, 4]


def aggregate_eval_stats(eval_pred) -> dict[str, float]:
    """`compute_metrics` for the Trainer: means of the per-query statistics of the whole eval set."""
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, len(STAT_COLUMNS))
    acc, pos, neg, hardest = (stats[:, i] for i in range(len(STAT_COLUMNS)))
    return {
        "accuracy": float(np.mean(acc)),
        "positive_similarity": float(np.nanmean(pos)),
        "negative_similarity": float(np.nanmean(neg)),
        "margin": float(np.nanmean(pos - hardest)),
    }


class MultiNegEmbeddingTrainer(Trainer):
    """Trainer for `hfemb.modeling.EmbeddingModel` on `MultiNegCollator` batches.

    Extra arguments: ``loss_config`` (temperature, in-batch negatives, false-negative masking) and
    ``train_lengths`` (per-row lengths for ``train_sampling_strategy="group_by_length"``).
    """

    loss_is_scaled_for_ga = False  # mean loss per micro-batch: let Trainer divide by accumulation steps

    def __init__(self, *args, loss_config: LossConfig | None = None, train_lengths: list[int] | None = None, **kwargs):
        kwargs.setdefault("compute_metrics", aggregate_eval_stats)
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or LossConfig()
        self.train_lengths = train_lengths
        self._train_correct = 0.0
        self._train_seen = 0

    # ---- loss ---------------------------------------------------------------------------------
    def _forward_loss(self, model, inputs):
        q = model(inputs["query_input_ids"], inputs["query_attention_mask"])  # [B, D]
        d = model(inputs["doc_input_ids"], inputs["doc_attention_mask"])  # [B*G, D]
        if d.shape[0] % q.shape[0]:
            raise ValueError(f"batch has {q.shape[0]} queries but {d.shape[0]} documents (not a multiple)")
        c = self.loss_config
        out = info_nce_loss(
            q, d, group_size=d.shape[0] // q.shape[0], temperature=c.temperature,
            in_batch_negatives=c.in_batch_negatives, mask_false_negatives=c.mask_false_negatives,
            false_negative_margin=c.false_negative_margin, doc_text_ids=inputs.get("doc_text_ids"),
        )
        return q, d, out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q, d, out = self._forward_loss(model, inputs)
        if model.training:
            with torch.no_grad():
                self._train_correct += float((out.logits.argmax(dim=-1) == out.labels).sum())
                self._train_seen += q.shape[0]
        return (out.loss, {"query_embeddings": q, "doc_embeddings": d}) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            q, d, out = self._forward_loss(model, inputs)
            loss = out.loss.detach()
            if prediction_loss_only:
                return loss, None, None
            stats = per_query_stats(q, d, out.logits, out.labels)
        return loss, stats, stats  # labels must be non-None for compute_metrics to run

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._train_seen:
            logs["accuracy"] = round(self._train_correct / self._train_seen, 4)
            self._train_correct, self._train_seen = 0.0, 0
        super().log(logs, *args, **kwargs)
        if "loss" in logs:
            for cb in self.callback_handler.callbacks:
                bar = getattr(cb, "training_bar", None) if isinstance(cb, ProgressCallback) else None
                if bar is not None:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('accuracy', float('nan')):.3f}")

    # ---- sampling -----------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.train_lengths is not None:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=self.train_lengths,
                generator=torch.Generator().manual_seed(self.args.data_seed or self.args.seed),
            )
        return super()._get_train_sampler(train_dataset)

    # ---- saving and loading -------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints: the adapter only for LoRA, the full backbone otherwise; tokenizer and
        sentence-transformers files in both cases (`EmbeddingModel.save_pretrained`)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        load_backbone_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_backbone_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def load_backbone_weights(model, folder: str) -> None:
    """Load the weights a checkpoint of `MultiNegEmbeddingTrainer._save` holds into ``model`` in place."""
    from safetensors.torch import load_file

    adapter = os.path.join(folder, "adapter_model.safetensors")
    if os.path.exists(adapter):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.backbone, load_file(adapter))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{adapter}: unexpected adapter keys {unexpected[:5]}")
        return
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        state = load_file(single)
    elif os.path.exists(index):
        state = {}
        for shard in sorted(set(json.load(open(index))["weight_map"].values())):
            state.update(load_file(os.path.join(folder, shard)))
    else:
        raise FileNotFoundError(f"no adapter_model.safetensors or model.safetensors in checkpoint {folder}")
    backbone = model.backbone
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    tied = set(getattr(backbone, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


class JsonlLogCallback(TrainerCallback):
    """Append every log entry (train and eval) as one JSON line to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in logs.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
