"""`MultiNegEmbeddingTrainer`: a `transformers.Trainer` for contrastive embedding training.

Each batch (from `hfemb.training.collator.MultiNegCollator`) holds B queries and, for each, its positive and N mined
negatives. Queries go through the model in one forward pass and all B*(1+N) documents in another; the
loss is `hfemb.training.loss.info_nce_loss`. Everything else -- AdamW, cosine schedule with warmup, weight-decay
groups that exclude biases and every norm weight (`Trainer.get_decay_parameter_names`), mixed precision,
gradient accumulation, checkpoints, best-model tracking, resuming -- is the stock Trainer's.

Gradient accumulation: the loss is a mean over the queries of a micro-batch and batches carry no
``labels`` key, so the Trainer divides it by the accumulation steps exactly once
(``loss_is_scaled_for_ga = False``).

Multi-process (torchrun / accelerate DDP, DeepSpeed): with ``loss.cross_device_negatives`` (and in-batch
negatives) every process scores its queries against the documents of all processes
(`hfemb.training.distributed.gather_rows`, gradients flow back to their owners, labels offset by the rank); the
gradient then equals the single-process gradient on the concatenated batch.
GradCache (``grad_cache_mini_batch``): see `hfemb.training.grad_cache`.
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

from hfemb.training.config import LossConfig, resolved_distill_weight
from hfemb.training.distill import distill_kl_loss, matryoshka_loss, truncate_normalize
from hfemb.training.distributed import gather_rows, with_gathered_weights, world_size
from hfemb.training.loss import LossOutput, info_nce_loss

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
    """Trainer for `hfemb.modeling.model.EmbeddingModel` on `MultiNegCollator` batches.

    Extra arguments: ``loss_config`` (temperature, in-batch and cross-device negatives, false-negative
    masking), ``train_lengths`` (per-row lengths for ``train_sampling_strategy="group_by_length"``) and
    ``grad_cache_mini_batch`` (rows per forward pass with GradCache; None/0 = off).
    """

    loss_is_scaled_for_ga = False  # mean loss per micro-batch: let Trainer divide by accumulation steps

    def __init__(self, *args, loss_config: LossConfig | None = None, train_lengths: list[int] | None = None,
                 grad_cache_mini_batch: int | None = None, **kwargs):
        kwargs.setdefault("compute_metrics", aggregate_eval_stats)
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or LossConfig()
        self.train_lengths = train_lengths
        self.grad_cache_mini_batch = grad_cache_mini_batch or None
        if self.grad_cache_mini_batch and self.is_deepspeed_enabled:
            raise ValueError("grad_cache_mini_batch does not work with DeepSpeed (accelerate steps its engine after "
                             "each backward call)")
        self._train_correct = 0.0
        self._train_seen = 0

    # ---- loss ---------------------------------------------------------------------------------
    def _loss(self, q: torch.Tensor, d: torch.Tensor, inputs) -> LossOutput:
        """InfoNCE of this process's queries [B, D] against its documents [B*G, D], or, with cross-device
        negatives, against every process's documents (gathered with gradients; labels offset)."""
        if d.shape[0] % q.shape[0]:
            raise ValueError(f"batch has {q.shape[0]} queries but {d.shape[0]} documents (not a multiple)")
        c = self.loss_config
        group_size, text_ids, offset = d.shape[0] // q.shape[0], inputs.get("doc_text_ids"), None
        all_q, q_ids, q_offset = None, inputs.get("query_text_ids"), None
        if c.cross_device_negatives and c.in_batch_negatives and world_size() > 1:
            d, offset = gather_rows(d)  # [M, D], every process's documents in rank order
            if text_ids is not None:
                text_ids, _ = gather_rows(text_ids.to(d.device))  # [M]
            if c.query_negatives:
                all_q, q_offset = gather_rows(q)  # [Mq, D]
                if q_ids is not None:
                    q_ids, _ = gather_rows(q_ids.to(q.device))  # [Mq]
        def nce(qq: torch.Tensor, dd: torch.Tensor, all_qq: torch.Tensor | None) -> LossOutput:
            return info_nce_loss(
                qq, dd, group_size=group_size, temperature=c.temperature, in_batch_negatives=c.in_batch_negatives,
                mask_duplicates=c.mask_duplicates, mask_false_negatives=c.mask_false_negatives,
                false_negative_margin=c.false_negative_margin, doc_text_ids=text_ids, doc_offset=offset,
                query_negatives=c.query_negatives, document_negatives=c.document_negatives,
                all_queries=all_qq, query_text_ids=q_ids, query_offset=q_offset,
            )

        out = nce(q, d, all_q)
        if c.matryoshka_dims:  # InfoNCE on each truncated, re-normalised prefix (hfemb.training.distill)
            out.loss = matryoshka_loss(
                q, d, lambda qq, dd: out.loss if qq.shape[1] >= q.shape[1] else nce(
                    qq, dd, truncate_normalize(all_q, qq.shape[1]) if all_q is not None else None).loss,
                c.matryoshka_dims, c.matryoshka_weights)
        teacher = inputs.get("teacher_scores")  # [B, G] when the rows carry teacher scores
        weight = resolved_distill_weight(c, teacher is not None)
        if weight and teacher is not None:  # (run_training checks up front that training rows carry them)
            out.loss = out.loss + weight * distill_kl_loss(q, d, teacher, group_size=group_size,
                                                           temperature=c.distill_temperature, doc_offset=offset)
        return out

    def _forward_loss(self, model, inputs):
        q = model(inputs["query_input_ids"], inputs["query_attention_mask"])  # [B, D]
        d = model(inputs["doc_input_ids"], inputs["doc_attention_mask"])  # [B*G, D]
        return q, d, self._loss(q, d, inputs)

    def _count_correct(self, out: LossOutput) -> None:
        with torch.no_grad():
            self._train_correct += float((out.logits.argmax(dim=-1) == out.labels).sum())
            self._train_seen += out.labels.shape[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q, d, out = self._forward_loss(model, inputs)
        if model.training:
            self._count_correct(out)
        return (out.loss, {"query_embeddings": q, "doc_embeddings": d}) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step, or with ``grad_cache_mini_batch`` a GradCache step (`hfemb.training.grad_cache`): same
        loss and gradients, activations of one mini-batch at a time."""
        if not self.grad_cache_mini_batch:
            return super().training_step(model, inputs, num_items_in_batch)
        from hfemb.training.grad_cache import grad_cache_step

        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps  # as the stock step divides the loss
        with self.compute_loss_context_manager():
            out = grad_cache_step(model, inputs, lambda q, d: self._loss(q, d, inputs), self.grad_cache_mini_batch,
                                  self.accelerator.backward, scale=scale,
                                  no_sync=lambda: self.accelerator.no_sync(model))
        self._count_correct(out)
        return out.loss.detach() * scale

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
            correct, seen = self._train_correct, self._train_seen
            if world_size() > 1:  # every process logs at the same steps: count all processes' queries
                counts = torch.tensor([correct, seen], dtype=torch.float64, device=self.args.device)
                torch.distributed.all_reduce(counts)
                correct, seen = counts.tolist()
            logs["accuracy"] = round(correct / seen, 4)
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
        sentence-transformers files in both cases (`EmbeddingModel.save_pretrained`). ``state_dict``: the
        weights `Trainer.save_model` gathered from every process (DeepSpeed, FSDP) -- under ZeRO-3 the
        model's own parameters are empty shards; ``{}``: none gathered (Trainer then writes a DeepSpeed
        checkpoint instead)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict:
            model = with_gathered_weights(model, state_dict)
        if state_dict is None or state_dict:
            model.save_pretrained(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        load_backbone_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # from the engine's own checkpoint (partitioned weights under ZeRO-3)
            return super()._load_best_model()
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
    """Append every log entry (train and eval) as one JSON line to ``path``. ``fresh``: remove an old log when
    training really begins (not before: a run that fails while setting up keeps the previous run's log)."""

    def __init__(self, path: str, fresh: bool = False):
        self.path, self.fresh = path, fresh

    def on_train_begin(self, args, state, control, **kwargs):
        if self.fresh and state.is_world_process_zero and os.path.exists(self.path):
            os.remove(self.path)
        self.fresh = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in logs.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
