"""Checkpoint averaging (``training.average_checkpoints: k``): the exported model (``merged/``, and what is
pushed) is the per-tensor fp32 mean of the last k checkpoints this run saved, by global step.

* Full fine-tuning: the mean of the checkpoints' weights (each checkpoint is a full model folder).
* LoRA: the mean of the *merged* weights ``W + B_i A_i s`` of each checkpoint i, never ``W + avg(B) avg(A) s``
  (a product of averages is not the average of the products). Each checkpoint is merged onto the base exactly
  as `hfemb.training.merging.merge_adapter` does (base in its training dtype, upcast to fp32, merged in fp32
  on the CPU), after the trainer is freed. ``adapter/`` stays the last step's adapter: an average of merged
  models is in general no rank-r adapter. ``export.merged_dtype`` auto stores the average in float32.
* ``load_best_model_at_end``: refused when set explicitly (the two choose the exported model in different
  ways; averaging a window that ends at the best checkpoint would need the checkpoints before it, which
  ``save_total_limit`` rotation deletes, and would export a model nobody evaluated as "best"); hfemb's own
  default of it is turned off when averaging is on.
* DeepSpeed: refused (a ZeRO checkpoint of a full model holds 16-bit gathered weights or needs
  ``zero_to_fp32``; not supported). Use DDP.

Memory (CPU): full = two fp32 copies of the model (sum and the checkpoint being read); LoRA = the same, plus
one base load per checkpoint (k loads of the base from disk).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import save_atomically
from hfemb.modeling.dtypes import DTYPES
from hfemb.modeling.merge_weights import AVERAGING_FILE, load_state_dict, write_model_folder
from hfemb.modeling.loading import load_embedding_model
from hfemb.training.resume import checkpoint_problem, checkpoint_step

log = logging.getLogger("hfemb.training.averaging")
FIELD = "training.average_checkpoints"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def averaging_k(training: dict) -> int:
    """k of ``training.average_checkpoints`` (0 when off)."""
    return int(training.get("average_checkpoints") or 0)


def check_averaging_config(training: dict, where: str = "config") -> None:
    """What the config alone shows cannot give k checkpoints to average, as one `ConfigError` naming the field."""
    k = training.get("average_checkpoints")
    if not k:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"{where}: '{FIELD}' must be a whole number of checkpoints >= 1 (0 or null: off), got {k!r}")
    save = str(training.get("save_strategy", "epoch"))
    if save in ("no", "best"):
        why = "saves no checkpoints" if save == "no" else "saves an unknown number of checkpoints (only new bests)"
        raise ConfigError(f"{where}: '{FIELD}' is {k} but 'training.save_strategy' {save!r} {why}; use \"steps\" "
                          "(with save_steps) or \"epoch\"")
    limit = training.get("save_total_limit")
    if limit is not None and limit < k:
        raise ConfigError(f"{where}: '{FIELD}' is {k} but 'training.save_total_limit' is {limit}: only the last "
                          f"{limit} checkpoint(s) are kept; set save_total_limit to {k} or more (or null)")
    if training.get("load_best_model_at_end"):
        raise ConfigError(f"{where}: '{FIELD}' and 'training.load_best_model_at_end' both choose the exported model: "
                          "averaging exports the mean of the last checkpoints, not the best one; set "
                          "load_best_model_at_end=false (or average_checkpoints=0)")
    if training.get("deepspeed"):
        raise ConfigError(f"{where}: '{FIELD}' does not work with 'training.deepspeed' (ZeRO checkpoints hold "
                          "16-bit gathered or partitioned weights); average with DDP, or set average_checkpoints=0")
    max_steps = training.get("max_steps") or -1
    save_steps = training.get("save_steps", training.get("eval_steps", 500))
    if save == "steps" and max_steps > 0 and isinstance(save_steps, (int, float)) and save_steps >= 1:
        saves = planned_save_steps(int(max_steps), math.ceil(save_steps))
        if len(saves) < k:
            raise ConfigError(f"{where}: '{FIELD}' is {k} but this run saves only {len(saves)} checkpoint(s) (max_steps "
                              f"{max_steps}, save_steps {save_steps}: steps {_steps_text(saves)}); lower save_steps "
                              f"or average fewer")


def planned_save_steps(max_steps: int, save_steps: int, after: int = 0) -> list[int]:
    """Global steps at which the Trainer saves with ``save_strategy: steps``: every multiple of ``save_steps``
    and the last step (transformers' ``DefaultFlowCallback``), those after ``after``."""
    steps = set(range(save_steps, max_steps + 1, save_steps)) | {max_steps}
    return sorted(s for s in steps if s > after)


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


class CheckpointAveragingCallback(TrainerCallback):
    """Checks, once the Trainer knows the number of steps (before the first one), that the run will save
    ``k`` checkpoints, and records the steps it saves (so that stale checkpoints of an earlier run in the same
    folder are never averaged). ``resumed_from``: the checkpoint this run resumed from; the complete checkpoints
    up to its step count as saved by this run."""

    def __init__(self, k: int, output_dir: str | os.PathLike, resumed_from: str | None = None):
        self.k, self.saved = k, []
        if resumed_from:
            step = checkpoint_step(resumed_from)
            self.saved = [s for s, _ in complete_checkpoints(output_dir) if s <= step]

    def on_train_begin(self, args, state, control, **kwargs):
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy == "steps":
            future = planned_save_steps(state.max_steps, int(state.save_steps), after=state.global_step)
        else:  # epoch: one save per epoch; a partial last epoch also ends with a save
            future = list(range(max(0, math.ceil(state.num_train_epochs) - math.floor(state.epoch or 0))))
        if len(self.saved) + len(future) < self.k:
            raise ConfigError(f"'{FIELD}' is {self.k} but this run saves only {len(self.saved) + len(future)} "
                              f"checkpoint(s) ({state.max_steps} steps, save_strategy {strategy!r}"
                              + (f", save_steps {state.save_steps}" if strategy == "steps" else "")
                              + "); save more often, train longer or average fewer")

    def on_save(self, args, state, control, **kwargs):
        if state.global_step not in self.saved:
            self.saved.append(state.global_step)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete ``checkpoint-N`` in ``output_dir``, by step."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted((s, p) for s, p in found if checkpoint_problem(p) is None)


def checkpoints_to_average(output_dir: str | os.PathLike, saved_steps: list[int], k: int) -> list[Path]:
    """The checkpoints of the last ``k`` steps in ``saved_steps`` (this run's saves), oldest first; an error
    naming the missing ones when fewer than ``k`` are complete on disk."""
    on_disk = dict(complete_checkpoints(output_dir))
    wanted = sorted(set(saved_steps))[-k:]
    missing = [s for s in wanted if s not in on_disk]
    if len(wanted) < k or missing:
        raise HfembError(f"'{FIELD}' is {k} but only {len(wanted) - len(missing)} complete checkpoint(s) of this run "
                         f"are in {output_dir} (saved at steps {_steps_text(sorted(set(saved_steps)))}"
                         + (f"; missing checkpoint-{', checkpoint-'.join(map(str, missing))}" if missing else "") + ")")
    return [on_disk[s] for s in wanted]


def _accumulate(total: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor], where: Path) -> dict:
    if total is None:
        return {name: t.detach().float().clone() if t.is_floating_point() else t.clone() for name, t in state.items()}
    if set(total) != set(state):
        raise HfembError(f"{where}: its tensors differ from the first checkpoint's "
                         f"({sorted(set(total) ^ set(state))[:5]}); cannot average")
    for name, t in state.items():
        if t.is_floating_point():
            total[name] += t.detach().float()
        else:
            total[name] = t.clone()  # integer buffers: the last checkpoint's
    return total


def average_full_checkpoints(folders: list[Path], template: str | os.PathLike, output_dir: str | os.PathLike,
                             record: dict | None = None) -> dict:
    """``output_dir`` (replaced atomically; may be ``template``) = the model folder ``template`` (the final
    model: tokenizer, sentence-transformers files) with the fp32 mean of the checkpoints' weights, each tensor
    stored in the checkpoints' dtype, and ``record`` (+ the stored dtype) as ``hfemb_averaging.json``.
    Returns the record."""
    total, dtypes = None, {}
    for folder in folders:
        state = load_state_dict(folder)
        dtypes = {name: t.dtype for name, t in state.items()}
        total = _accumulate(total, state, folder)
        del state
    averaged = {name: (t / len(folders)).to(dtypes[name]).contiguous() if t.is_floating_point() else t
                for name, t in total.items()}
    stored = sorted({str(d).replace("torch.", "") for d in dtypes.values() if d.is_floating_point})
    record = {**(record or {}), "stored_dtype": stored[0] if len(stored) == 1 else stored}
    write_model_folder(template, averaged, output_dir, {AVERAGING_FILE: record})
    return record


def average_lora_checkpoints(folders: list[Path], output_dir: str | os.PathLike, *, base_dtype: str = "float32",
                             merged_dtype: str = "auto", trust_remote_code: bool = False,
                             record: dict | None = None) -> dict:
    """``output_dir`` = a plain full model whose weights are the fp32 mean over the adapter checkpoints of each
    one merged onto the base (``base_dtype``: the dtype the base was trained in; ``merged_dtype``: auto =
    float32), with ``record`` (+ the dtypes) as ``hfemb_averaging.json``. Returns the record."""
    if merged_dtype not in DTYPES:
        raise HfembError(f"dtype must be one of {', '.join(DTYPES)}, got {merged_dtype!r}")
    stored = "float32" if merged_dtype == "auto" else merged_dtype
    total, model = None, None
    for folder in folders:
        if not (folder / "adapter_config.json").is_file():
            raise HfembError(f"{folder}: not a LoRA checkpoint (no adapter_config.json)")
        del model
        model = load_embedding_model(str(folder), torch_dtype=base_dtype, trust_remote_code=trust_remote_code,
                                     device="cpu")
        model.backbone.float()  # exact: the base's bf16/fp16 values are fp32 values
        model.backbone = model.backbone.merge_and_unload()  # W + B A s of this checkpoint, in fp32
        total = _accumulate(total, model.backbone.state_dict(), folder)
    with torch.no_grad():
        averaged = {name: t / len(folders) if t.is_floating_point() else t for name, t in total.items()}
        model.backbone.load_state_dict(averaged)
        del total, averaged
        for p in model.backbone.parameters():
            if p.is_floating_point():
                p.data = p.data.to(getattr(torch, stored))
    record = {**(record or {}), "base_dtype": base_dtype, "stored_dtype": stored}

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        Path(folder, AVERAGING_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    save_atomically(write, output_dir)
    return record


def averaging_record(k: int, folders: list[Path], lora: bool) -> dict:
    """What ``train_summary.json`` (``checkpoint_averaging``) and ``merged/hfemb_averaging.json`` record."""
    return {"k": k, "steps": [checkpoint_step(f) for f in folders], "checkpoints": [f.name for f in folders],
            "rule": "per-tensor mean in fp32 of " + ("each checkpoint's LoRA merged onto the base (W + s B A)"
                                                    if lora else "the checkpoints' weights"),
            "final_eval": "of the last step's model, before averaging"}
