"""After training, ``merged/`` interpolated with the base (``export.base_merge_alpha``): at a given alpha, or at
the alpha of a list that scores best on the run's own eval set (`hfemb.training.base_merge_sweep`)."""

from __future__ import annotations

import logging
from pathlib import Path

from hfemb.modeling.loading import load_embedding_model
from hfemb.modeling.merge_weights import (AVERAGING_FILE, PROVENANCE_FILE, load_state_dict, merge_record,
                                         merge_state_dicts, public_name, read_merge_record, write_model_folder)
from hfemb.training.base_merge_sweep import metric_key, sweep_base_merge
from hfemb.training.config import TrainConfig
from hfemb.training.distributed import deepspeed_config_off
from hfemb.training.run_setup import resolve_dtype

log = logging.getLogger(__name__)


def load_base_state(cfg: TrainConfig, keys, ds_config=None) -> dict:
    """The base's backbone tensors named in ``keys``, in fp32 on the CPU, loaded the way training loaded it (so a
    causal-LM checkpoint's ``model.`` prefix and head are dropped as they were then). ``ds_config``: the DeepSpeed
    ZeRO-3 config to switch off while it loads (whole, not into shards)."""
    with deepspeed_config_off(ds_config):
        base_model = load_embedding_model(cfg.model.name_or_path, torch_dtype="float32", device="cpu",
                                          trust_remote_code=cfg.model.trust_remote_code)
    base = {k: v for k, v in base_model.backbone.state_dict().items() if k in keys}
    del base_model
    return base


def merge_with_base(cfg: TrainConfig, out: Path, alpha: float, ds_config=None, chosen_on: dict | None = None,
                    states: tuple[dict, dict] | None = None) -> dict:
    """``merged/`` = (1 - alpha) * base + alpha * ``merged/``, per tensor in fp32, replaced atomically
    (`hfemb.modeling.merge_weights`: ``hfemb_merge.json`` records it, the card shows it). Stored in
    ``export.merged_dtype``, float32 for auto (a second rounding to 16 bits would eat into alpha * delta).
    A checkpoint average's record is kept; ``chosen_on`` (`choose_alpha_on_eval`) is recorded, and its ``states``
    (trained, base) are used instead of loading both again (and emptied). Returns the record for
    ``train_summary.json``."""
    import torch

    target = out / "merged"
    trained, base = states or (None, None)
    if trained is None:
        trained = load_state_dict(target)
        base = load_base_state(cfg, trained, ds_config)
    stored = "float32" if cfg.export.merged_dtype == "auto" else cfg.export.merged_dtype
    merged = merge_state_dicts(base, trained, alpha, consume=True, dtype=getattr(torch, stored))
    averaged = read_merge_record(target, AVERAGING_FILE)
    record = {**merge_record("linear", alpha, cfg.model.name_or_path, "this run's trained weights", len(merged),
                             averaged), "by": "export.base_merge_alphas" if chosen_on else "export.base_merge_alpha",
              "stored_dtype": stored}
    if chosen_on:
        record["chosen_on"] = chosen_on
    extra = {PROVENANCE_FILE: record}
    if averaged:  # the card keeps saying the trained weights are a checkpoint average
        extra[AVERAGING_FILE] = averaged
    write_model_folder(target, merged, target, extra)
    log.info("merged/ = %.2g x the trained weights + %.2g x %s", alpha, 1 - alpha, cfg.model.name_or_path)
    return record


def sweep_metric(cfg: TrainConfig, evaluators) -> str:
    """What the alphas are compared by: ``training.metric_for_best_model`` when the evaluators report it (not a
    loss), else the main eval set's nDCG@10 (retrieval) or best F1 (pools)."""
    named = cfg.training.get("metric_for_best_model")
    reported = {n for ev in evaluators for n in ev.metric_names() if not n.endswith("best_threshold")}
    if named and metric_key(named) in reported:
        return metric_key(named)
    main = next((ev for ev in evaluators if ev.name is None), evaluators[0])
    fallback = main.prefix + ("ndcg@10" if main.kind == "retrieval" else "best_f1")
    if named:
        log.info("export.base_merge_alphas: %s is not an embedding metric of the eval set; alphas compared by %s",
                 named, fallback)
    return fallback


def choose_alpha_on_eval(cfg: TrainConfig, out: Path, alphas, evaluators, device: str | None = None,
                         ds_config=None) -> tuple[dict, tuple[dict, dict]]:
    """`sweep_base_merge` of ``merged/`` (the trained weights) and the base on the run's evaluators that report the
    metric (`sweep_metric`), in this process alone, with the model on ``device`` in the training dtype. Returns the
    sweep plus ``data`` (the eval sets) for ``hfemb_merge.json`` and ``train_summary.json``, and the (trained, base)
    state dicts for `merge_with_base`."""
    with deepspeed_config_off(ds_config):  # as training evaluated it (truncate_dim is not saved with the model)
        model = load_embedding_model(str(out / "merged"), torch_dtype=resolve_dtype(cfg), device=device,
                                     attn_implementation=cfg.model.attn_implementation,
                                     truncate_dim=cfg.model.truncate_dim,
                                     trust_remote_code=cfg.model.trust_remote_code)
    trained = load_state_dict(out / "merged")
    base = load_base_state(cfg, trained, ds_config)
    metric = sweep_metric(cfg, evaluators)
    used = [ev for ev in evaluators if metric in ev.metric_names()]  # (one set: the others need not run)
    sweep = sweep_base_merge(model, base, trained, used, alphas, metric)
    del model
    return {"data": ", ".join(public_name(ev.source) for ev in used), **sweep}, (trained, base)
