"""Choosing the interpolation with the base on a dev set: ``(1 - alpha) * base + alpha * tuned`` for each alpha of
a grid, scored by the training evaluators (`hfemb.training.evaluator`), the best alpha by one metric."""

from __future__ import annotations

import logging
import math

import torch

from hfemb.errors import ConfigError, HfembError
from hfemb.modeling.merge_weights import interpolate_tensor, load_state_dict, public_name

log = logging.getLogger(__name__)

def check_alphas(alphas) -> list[float]:
    """Distinct finite alphas, in the order given (one clear error otherwise); 1 is the tuned weights, 0 the base,
    above 1 extrapolates."""
    out = []
    for a in alphas:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ConfigError(f"alpha {a!r}: each alpha must be a finite number (1: the tuned weights, 0: the base)")
        if float(a) not in out:
            out.append(float(a))
    if not out:
        raise ConfigError("no alpha to choose from")
    return out


def metric_key(metric: str) -> str:
    """An evaluator metric as given (``roc_auc``) or as the Trainer logs it (``eval_roc_auc``)."""
    return metric[len("eval_"):] if metric.startswith("eval_") else metric


def backbone_tensors(state: dict, saved, prefix: str) -> dict:
    """Each saved tensor name -> the backbone's tensor: the same name, or the name without the head model's
    ``prefix.`` (a checkpoint saved with a task head, e.g. ``bert.`` or ``model.``, which transformers strips on
    loading). One clear error for a name that matches neither (e.g. a head's weights)."""
    out, missing = {}, []
    for name in saved:
        bare = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        if name in state:
            out[name] = state[name]
        elif bare in state:
            out[name] = state[bare]
        else:
            missing.append(name)
    if missing:
        raise HfembError(f"the tuned weights name tensors the model lacks: {sorted(missing)[:5]}")
    return out


def sweep_base_merge(model, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], evaluators, alphas,
                     metric: str, method: str = "linear") -> dict:
    """Score each alpha: ``model``'s backbone (an `EmbeddingModel` of the tuned weights) gets ``(1 - alpha) * base
    + alpha * tuned`` per tensor (fp32, stored in the backbone's dtype) and ``evaluators`` run on it in this
    process alone (not sharded). ``base`` / ``tuned``: state dicts with the backbone's tensor names (the tuned
    model's saved ``model.safetensors``). Returns ``{"metric", "values": {alpha: value}, "chosen"}``: the alpha
    with the highest value (a tie goes to the larger alpha, nearer the tuned weights). The backbone is left at the
    tuned weights."""
    alphas = check_alphas(alphas)
    key = metric_key(metric)
    state = model.backbone.state_dict()  # tensors sharing the parameters' storage: copy_ writes the model
    params = backbone_tensors(state, tuned, getattr(model.backbone, "base_model_prefix", ""))
    absent = sorted(k for k in tuned if k not in base)
    if absent:
        raise HfembError(f"base and tuned models differ in tensors: only in tuned {absent[:5]}")
    values: dict[float, float] = {}
    try:
        for alpha in alphas:
            with torch.no_grad():
                for name, t in tuned.items():
                    params[name].copy_(interpolate_tensor(base[name], t, alpha, method, params[name].dtype))
            metrics: dict[str, float] = {}
            for ev in evaluators:
                metrics.update(ev(model, sharded=False))
            if key not in metrics:
                raise ConfigError(f"metric {metric!r}: the evaluation reports {', '.join(sorted(metrics))}")
            values[alpha] = float(metrics[key])
            log.info("alpha %g: %s %.4f", alpha, key, values[alpha])
    finally:
        with torch.no_grad():
            for name, t in tuned.items():
                params[name].copy_(t.to(params[name].dtype))
    finite = {a: v for a, v in values.items() if math.isfinite(v)}
    if not finite:
        raise HfembError(f"{key} is not a finite number at any alpha: {values}")
    chosen = max(finite, key=lambda a: (finite[a], a))
    return {"metric": key, "values": {f"{a:g}": v for a, v in values.items()}, "chosen": chosen, "method": method}


def choose_alpha_on_dev(base: str, tuned: str, dev: str, alphas, metric: str | None = None, method: str = "linear",
                        device: str | None = None, truncate_dim: int | None = None,
                        trust_remote_code: bool = False) -> tuple[dict, tuple[dict, dict]]:
    """`sweep_base_merge` of two model folders on a dev file (labelled pools or pairs, a BEIR folder, any format
    `hfemb.data.formats.read_records` reads). ``metric`` None: what training picks its best checkpoint by, best
    F1 on a pool set, nDCG@10 on a retrieval set. The tuned model is loaded with its own prompts and pooling, in
    bf16 on a GPU that supports it, else fp32; texts are cut at run_eval's 512 tokens. Returns the sweep plus ``data``
    (the dev file by `public_name`), and the (base, tuned) state dicts for `merge_weights`."""
    from hfemb.evaluation.settings import EvalSettings
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.config import DataConfig
    from hfemb.training.evaluator import evaluator_from_file

    alphas = check_alphas(alphas)
    # run_eval's lengths (EvalSettings.max_length 512 for queries and documents), not training's query_max_len
    evaluator = evaluator_from_file(dev, name=None, data_config=DataConfig(query_max_len=EvalSettings.max_length,
                                                                           passage_max_len=EvalSettings.max_length))
    metric = metric or ("ndcg@10" if evaluator.kind == "retrieval" else "best_f1")
    names = [n for n in evaluator.base_metric_names() if n != "best_threshold"]  # (a threshold, not a score)
    if metric_key(metric) not in names:
        raise ConfigError(f"--metric {metric!r}: {dev} reports {', '.join(names)}")
    model = load_embedding_model(tuned, torch_dtype="auto", device=device, truncate_dim=truncate_dim,
                                 trust_remote_code=trust_remote_code)
    states = load_state_dict(base), load_state_dict(tuned)
    sweep = sweep_base_merge(model, *states, [evaluator], alphas, metric, method)
    return {"data": public_name(dev), **sweep}, states
