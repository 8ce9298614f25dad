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

Train-time statistics follow trl's pattern: each step appends to ``self._metrics[mode]`` values gathered from
every process through the accelerator; ``log`` turns them into means and clears them. The gather is
``accelerator.gather``, not ``gather_for_metrics``: the latter cuts the gathered rows to the dataset's remainder
once the dataloader has reached its end, and the Trainer fetches a whole gradient-accumulation window ahead,
so it would drop real queries of the window's earlier batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import ProgressCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from hfemb.errors import ConfigError
from hfemb.training.config import (LossConfig, resolved_distill_weight, resolved_pair_rank_weight,
                                   resolved_temperature)
from hfemb.training.distill import distill_kl_loss, distill_mse_loss, matryoshka_loss, pair_rank_loss, truncate_normalize
from hfemb.training.distributed import gather_rows, with_gathered_weights, world_size
from hfemb.training.evaluator import run_evaluators
from hfemb.training.grad_cache import grad_cache_step
from hfemb.training.loss import LossOutput, document_to_query_loss, info_nce_loss, own_negative_mask
from hfemb.training.redraw import RedrawnRows
from hfemb.training.sampling import NoDuplicateQuerySampler, SameDatasetSampler

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


def check_grad_cache_parallelism(args) -> None:
    """GradCache replays each mini-batch's random state (dropout) on the process that drew it; under
    ``nn.DataParallel`` (plain ``python run_train.py`` on a machine with several GPUs) the replicas draw on
    their own devices and the replay does not cover them, so the gradient would not be the batch's."""
    from transformers.training_args import ParallelMode

    if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise ConfigError(f"training.grad_cache_mini_batch does not work with nn.DataParallel ({args.n_gpu} GPUs in "
                          "one process): run `torchrun --nproc_per_node N run_train.py ...` (one process per GPU), "
                          "or limit this process to one GPU (CUDA_VISIBLE_DEVICES=0)")


class MultiNegEmbeddingTrainer(Trainer):
    """Trainer for `hfemb.modeling.model.EmbeddingModel` on `MultiNegCollator` batches.

    Extra arguments: ``loss_config`` (temperature, in-batch and cross-device negatives, false-negative
    masking), ``train_lengths`` (per-row lengths for ``train_sampling_strategy="group_by_length"``),
    ``grad_cache_mini_batch`` (rows per forward pass with GradCache; None/0 = off), ``no_duplicate_queries``
    (`hfemb.training.sampling.NoDuplicateQuerySampler` unless rows are grouped by length), ``dataset_weights``
    (several datasets: rows carry their dataset's index as ``"dataset"``; each step's batches come from one
    dataset, `hfemb.training.sampling.SameDatasetSampler`) and ``evaluators``
    (`hfemb.training.evaluator.EmbeddingEvaluator`: retrieval / F1 metrics of the live model, logged with the
    eval loss as ``eval_<metric>`` at every evaluation; ``eval_dataset=[]`` when there is no loss set).

    The defaults that depend on how the rows were mined (a null ``loss.temperature``: 0.05 on corpus-mined rows;
    a null ``loss.distill_weight``: 3.0 on corpus-mined rows with teacher scores) are resolved by
    `hfemb.training.runner.run_training`, which knows the files' mining mode. Built directly, the trainer sees
    no mode and treats the rows as pool rows: a null temperature is 0.1 and distillation is off.
    """

    loss_is_scaled_for_ga = False  # mean loss per micro-batch: let Trainer divide by accumulation steps

    def __init__(self, *args, loss_config: LossConfig | None = None, train_lengths: list[int] | None = None,
                 grad_cache_mini_batch: int | None = None, no_duplicate_queries: bool = True,
                 evaluators: list | None = None, dataset_weights: list[float] | None = None, **kwargs):
        kwargs.setdefault("compute_metrics", aggregate_eval_stats)
        super().__init__(*args, **kwargs)
        self.evaluators = list(evaluators or [])
        self._embedding_metrics: dict[str, float] | None = None
        self.loss_config = loss_config or LossConfig()
        if self.loss_config.temperature is None:  # auto outside run_training, which resolves it from the rows
            self.loss_config = dataclasses.replace(self.loss_config,
                                                   temperature=resolved_temperature(self.loss_config, []))
        self.train_lengths = train_lengths
        self.grad_cache_mini_batch = grad_cache_mini_batch or None
        self.no_duplicate_queries = no_duplicate_queries
        self.dataset_weights = list(dataset_weights) if dataset_weights is not None else None
        if self.grad_cache_mini_batch and self.is_deepspeed_enabled:
            raise ValueError("grad_cache_mini_batch does not work with DeepSpeed (accelerate steps its engine after "
                             "each backward call)")
        if self.grad_cache_mini_batch:
            check_grad_cache_parallelism(self.args)
        if self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
            # every backbone call gathers the sharded weights (a collective): all processes must make the same
            # number of calls, so no data-dependent length chunks (EmbeddingModel.forward)
            self.accelerator.unwrap_model(self.model).chunk_overhead_tokens = 0
        # per mode, lists of per-step values since the last log (trl's _metrics)
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

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
            if q_ids is not None:  # every process's query ids: positives of the same query are no negatives
                q_ids, q_offset = gather_rows(q_ids.to(q.device))  # [Mq]
            if c.query_negatives or c.doc_to_query_weight:
                all_q, q_offset = gather_rows(q)  # [Mq, D]

        def nce(qq: torch.Tensor, dd: torch.Tensor, all_qq: torch.Tensor | None) -> LossOutput:
            res = info_nce_loss(
                qq, dd, group_size=group_size, temperature=c.temperature, in_batch_negatives=c.in_batch_negatives,
                mask_duplicates=c.mask_duplicates, mask_false_negatives=c.mask_false_negatives,
                false_negative_margin=c.false_negative_margin, doc_text_ids=text_ids, doc_offset=offset,
                query_negatives=c.query_negatives, document_negatives=c.document_negatives,
                all_queries=all_qq, query_text_ids=q_ids, query_offset=q_offset,
                query_positive_ids=inputs.get("query_positive_ids"),
            )
            if c.doc_to_query_weight and c.in_batch_negatives:  # at every Matryoshka dimension too, as ST's
                positives = dd[(offset or 0) + torch.arange(qq.shape[0], device=dd.device) * group_size]  # [B, D]
                ids = c.mask_duplicates and text_ids is not None  # every process holds G documents per query
                res.loss = res.loss + c.doc_to_query_weight * document_to_query_loss(
                    all_qq if all_qq is not None else qq, positives, temperature=c.temperature,
                    query_offset=q_offset or 0, query_text_ids=q_ids if c.mask_duplicates else None,
                    positive_text_ids=text_ids[::group_size] if ids else None)
            return res

        out = nce(q, d, all_q)
        if c.matryoshka_dims:  # InfoNCE on each truncated, re-normalised prefix (hfemb.training.distill)
            out.loss = matryoshka_loss(
                q, d, lambda qq, dd: out.loss if qq.shape[1] >= q.shape[1] else nce(
                    qq, dd, truncate_normalize(all_q, qq.shape[1]) if all_q is not None else None).loss,
                c.matryoshka_dims, c.matryoshka_weights)
        teacher = inputs.get("teacher_scores")  # [B, G] when the rows carry teacher scores
        weight = resolved_distill_weight(c, teacher is not None)
        if weight and teacher is not None:  # (run_training checks up front that training rows carry them)
            term = (distill_mse_loss(q, d, teacher, group_size=group_size, doc_offset=offset) if c.distill_loss == "mse"
                    else distill_kl_loss(q, d, teacher, group_size=group_size, temperature=c.distill_temperature,
                                         doc_offset=offset))
            out.loss = out.loss + weight * term
        rank_weight = resolved_pair_rank_weight(c)
        if rank_weight and group_size > 1:  # this process's own (query, document) pairs, across its queries
            out.loss = out.loss + rank_weight * pair_rank_loss(
                q, d, group_size=group_size, scale=c.pair_rank_scale, doc_offset=offset,
                negative_mask=own_negative_mask(out, group_size))
        return out

    def _forward_loss(self, model, inputs):
        q = model(inputs["query_input_ids"], inputs["query_attention_mask"])  # [B, D]
        d = model(inputs["doc_input_ids"], inputs["doc_attention_mask"])  # [B*G, D]
        return q, d, self._loss(q, d, inputs)

    def _record_accuracy(self, out: LossOutput, mode: str = "train") -> None:
        """Queries whose positive ranks first, and queries, of this step on every process (a collective call:
        every process makes it at the same steps)."""
        with torch.no_grad():
            correct = (out.logits.argmax(dim=-1) == out.labels).float()  # [B]
            correct = self.accelerator.gather(correct)  # [B * processes]
        self._metrics[mode]["correct"].append(float(correct.sum()))
        self._metrics[mode]["queries"].append(float(correct.numel()))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q, d, out = self._forward_loss(model, inputs)
        if model.training:
            self._record_accuracy(out)
        return (out.loss, {"query_embeddings": q, "doc_embeddings": d}) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step, or with ``grad_cache_mini_batch`` a GradCache step (`hfemb.training.grad_cache`): same
        loss and gradients, activations of one mini-batch at a time."""
        if not self.grad_cache_mini_batch:
            return super().training_step(model, inputs, num_items_in_batch)

        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps  # as the stock step divides the loss
        with self.compute_loss_context_manager():
            out = grad_cache_step(model, inputs, lambda q, d: self._loss(q, d, inputs), self.grad_cache_mini_batch,
                                  self.accelerator.backward, scale=scale,
                                  no_sync=lambda: self.accelerator.no_sync(model))
        self._record_accuracy(out)
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

    # ---- evaluation: the eval loss pass plus the evaluators (hfemb.training.evaluator) -----------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if eval_dataset is not None or not self.evaluators:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = run_evaluators(self.evaluators, self.accelerator.unwrap_model(self.model), metric_key_prefix)
        if self.eval_dataset is not None and len(self.eval_dataset):
            self._embedding_metrics = metrics  # merged into the loss pass's metrics (one log row) by evaluation_loop
            try:
                return super().evaluate(None, ignore_keys, metric_key_prefix)
            finally:
                self._embedding_metrics = None
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._embedding_metrics:
            output.metrics.update(self._embedding_metrics)
        return output

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        metrics = self._metrics["train"]
        if "loss" in logs and metrics["queries"]:  # a training log: accuracy over every query since the last one
            logs["accuracy"] = round(sum(metrics["correct"]) / sum(metrics["queries"]), 4)
            metrics.clear()
        super().log(logs, *args, **kwargs)
        if "loss" in logs:
            for cb in self.callback_handler.callbacks:
                bar = getattr(cb, "training_bar", None) if isinstance(cb, ProgressCallback) else None
                if bar is not None:
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('accuracy', float('nan')):.3f}")

    # ---- sampling -----------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        self.epoch_sampler = self._build_train_sampler(train_dataset)
        return self.epoch_sampler

    def _run_epoch(self, model, epoch, *args, **kwargs):
        """Give the epoch to the rows (`RedrawnRows`: negatives redrawn per epoch) and to hfemb's sampler before
        the epoch's batches are drawn: accelerate's ``DataLoaderShard.set_epoch`` reaches neither the dataset
        under DDP (``BatchSamplerShard``) nor anything after ``skip_first_batches`` (a resumed epoch)."""
        for target in (self.train_dataset, getattr(self, "epoch_sampler", None)):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def _build_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.dataset_weights is not None:  # several datasets: one dataset per step, on every process
            return SameDatasetSampler([row["dataset"] for row in dataset], weights=self.dataset_weights,
                                      block_size=self.args.train_batch_size * self.args.world_size,  # one step
                                      seed=self.args.data_seed or self.args.seed,
                                      queries=[row["query"] for row in dataset] if self.no_duplicate_queries else None)
        if self.args.train_sampling_strategy == "group_by_length" and self.train_lengths is not None:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=self.train_lengths,
                generator=torch.Generator().manual_seed(self.args.data_seed or self.args.seed),
            )
        if self.no_duplicate_queries and isinstance(dataset, (list, tuple, RedrawnRows)) and len(dataset) \
                and "query" in dataset[0]:
            return NoDuplicateQuerySampler([row["query"] for row in dataset],
                                           block_size=self.args.per_device_train_batch_size * self.args.world_size,
                                           seed=self.args.data_seed or self.args.seed)
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under ZeRO-3 with LoRA, gather only the trainable weights (``exclude_frozen_parameters``: the frozen
        base is not gathered to the main process at every checkpoint); otherwise the stock method."""
        ds = self.model_wrapped if self.is_deepspeed_enabled else None
        gather = (ds is not None and is_deepspeed_zero3_enabled()
                  and getattr(self.accelerator.unwrap_model(self.model), "is_peft", False)
                  and ds.config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save"))
        if not gather:
            return super().save_model(output_dir, _internal_call)
        state_dict = ds._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)  # every process
        self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """DeepSpeed + LoRA: the engine's checkpoint without the frozen base (transformers excludes it only when
        the model itself is a ``PeftModel``, which the EmbeddingModel around it is not: each checkpoint of the
        8B would hold the whole ~16 GB base)."""
        if not (self.is_deepspeed_enabled and getattr(self.accelerator.unwrap_model(self.model), "is_peft", False)):
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The stock loop; resuming a DeepSpeed + LoRA checkpoint (saved without the frozen base, see
        `_save_optimizer_and_scheduler`) loads the engine's module state non-strictly, as transformers does for a
        ``PeftModel`` (the frozen base comes from the model as loaded)."""
        if not (resume_from_checkpoint and self.is_deepspeed_enabled
                and getattr(self.accelerator.unwrap_model(self.model), "is_peft", False)):
            return super().train(resume_from_checkpoint, *args, **kwargs)
        import functools

        import transformers.trainer as hf_trainer

        original = hf_trainer.deepspeed_load_checkpoint
        hf_trainer.deepspeed_load_checkpoint = functools.partial(_load_deepspeed_non_strict, original)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = original

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        load_backbone_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:  # from the engine's own checkpoint (partitioned weights under ZeRO-3)
            return super()._load_best_model()
        load_backbone_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def _load_deepspeed_non_strict(load, engine, checkpoint_path, load_module_strict=True):
    return load(engine, checkpoint_path, load_module_strict=False)


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
