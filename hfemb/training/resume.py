"""Crash recovery of a training output folder: complete checkpoints only, the log cut back to the resumed
step, leftovers of a killed save removed, and the training loss of the whole run across resumes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from hfemb.errors import HfembError
from hfemb.io_utils import atomic_open

log = logging.getLogger("hfemb.training.resume")
TRAINER_STATE = "trainer_state.json"
LOSS_FILE = "hfemb_loss.json"  # in each checkpoint: the summed training loss of steps 1..global_step
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be resumed from (None: it is complete). The Trainer writes ``trainer_state.json``
    last, so a checkpoint killed while being written lacks it (or holds half of it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (killed while being written)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{TRAINER_STATE} is unreadable (killed while being written)"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model weights"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None if there is none), and the newer
    incomplete ones skipped, as (folder, reason)."""
    found = sorted(((int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
                    if (m := _CHECKPOINT.match(p.name)) and p.is_dir()), reverse=True)
    skipped = []
    for _, folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder), skipped
        skipped.append((str(folder), problem))
    return None, skipped


def resolve_resume(output_dir: str | os.PathLike, resume: bool | str) -> str | None:
    """The checkpoint to resume from: ``resume`` itself (which must be complete) or, for ``True``, the newest
    complete one, each incomplete newer one skipped with a warning. Raises `HfembError` when there is none."""
    if not resume:
        return None
    if isinstance(resume, str):
        problem = checkpoint_problem(resume)
        if problem == "no such folder":
            raise HfembError(f"--resume {resume}: no such checkpoint folder")
        if problem:
            raise HfembError(f"--resume {resume}: incomplete checkpoint ({problem}); resume from an earlier one, "
                             "or pass --resume alone to take the newest complete one")
        return resume
    found, skipped = last_complete_checkpoint(output_dir)
    for folder, problem in skipped:
        log.warning("--resume: skipping incomplete checkpoint %s: %s", folder, problem)
    if found is None:
        extra = f" ({len(skipped)} incomplete: {', '.join(Path(f).name for f, _ in skipped)})" if skipped else ""
        raise HfembError(f"--resume: no complete checkpoint-* folder in {output_dir} to resume from{extra}")
    if skipped:
        print(f"resuming from {found}; skipped incomplete {', '.join(Path(f).name for f, _ in skipped)}", flush=True)
    return found


def checkpoint_step(folder: str | os.PathLike) -> int:
    return int(json.loads(Path(folder, TRAINER_STATE).read_text(encoding="utf-8"))["global_step"])


def truncate_train_log(path: str | os.PathLike, step: int) -> int:
    """Keep the lines of ``train_log.jsonl`` up to ``step`` (the resumed checkpoint's), so the steps run after
    that checkpoint and before the interruption are not logged twice; unreadable lines are dropped.
    Rewritten atomically; returns the number of lines removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, removed = [], 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and int(row.get("step", 0)) <= step
            except (ValueError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                removed += 1
    if removed:
        with atomic_open(path) as fh:
            fh.writelines(kept)
    return removed


def remove_save_leftovers(output_dir: str | os.PathLike) -> list[str]:
    """Remove what a save killed midway leaves in ``output_dir``: the hidden temporary folders of atomic
    folder writes (``.merged.*``, ``.adapter.*``) and temporary files (``.*.tmp``). Call it after this
    run's own saves have finished. Returns the names removed."""
    removed = []
    for path in sorted(Path(output_dir).glob(".*")):
        if path.is_dir() and path.name.startswith((".merged.", ".adapter.")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info("removed leftovers of an interrupted save in %s: %s", output_dir, ", ".join(removed))
    return removed


class RunLossCallback(TrainerCallback):
    """Writes ``hfemb_loss.json`` into each checkpoint: the summed training loss of all steps so far (this run
    plus the run it resumed from), so that a resumed run reports the loss of the whole run. Set ``trainer``
    after building the Trainer; ``previous``: the sum stored in the checkpoint resumed from (None: unknown, as
    for a checkpoint of an older hfemb; then no sum is written, rather than a wrong one)."""

    def __init__(self, previous: float | None = 0.0):
        self.trainer, self.previous = None, previous

    def total(self) -> float:
        """Summed loss of steps 1..global_step. Reads the Trainer's running sums (``_total_loss_scalar``, drained
        at each logging step, and ``_tr_loss``), as ``Trainer._finalize_training`` does."""
        t = self.trainer
        running = float(getattr(t, "_total_loss_scalar", 0.0))
        pending = getattr(t, "_tr_loss", None)
        running += float(pending.item()) if hasattr(pending, "item") else float(pending or 0.0)
        return self.previous + running

    def on_save(self, args, state, control, **kwargs):
        if self.trainer is None or self.previous is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
        if folder.is_dir():
            with atomic_open(folder / LOSS_FILE) as fh:
                json.dump({"global_step": state.global_step, "loss_sum": self.total()}, fh)


def previous_loss_sum(checkpoint: str | None) -> tuple[float, int] | None:
    """(summed loss, step) stored in ``checkpoint`` by `RunLossCallback`; None without it (older checkpoints)."""
    if not checkpoint:
        return 0.0, 0
    try:
        data = json.loads(Path(checkpoint, LOSS_FILE).read_text(encoding="utf-8"))
        return float(data["loss_sum"]), int(data["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def whole_run_loss(this_run_loss: float, this_run_steps: int, previous: tuple[float, int] | None,
                   global_step: int) -> float | None:
    """Mean training loss over all ``global_step`` steps: the previous runs' summed loss plus this run's
    (``this_run_loss`` is the Trainer's mean over its ``this_run_steps``). None when the previous sum is unknown."""
    if previous is None or global_step <= 0:
        return None
    return (previous[0] + this_run_loss * this_run_steps) / global_step
