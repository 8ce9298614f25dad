"""Weight merging of a tuned model with its base (LM-Cocktail; model merging in the Qwen3-Embedding report):
per-tensor interpolation in fp32, ``linear`` ``(1 - alpha) * base + alpha * tuned`` or ``slerp`` (spherical
interpolation of each flattened tensor pair, linear where the two are nearly parallel), and the average of
several checkpoints (``average_state_dicts``).

Both folders are full models with the same tensor names and shapes (a merged training output, not an adapter
folder); the output is the tuned folder with its weights replaced (tokenizer, sentence-transformers files and
prompts kept; not its model card or threshold, which describe the tuned weights), written atomically, each
tensor stored back in the tuned model's dtype, plus ``hfemb_merge.json`` (method, alpha, the models by Hub id or
relative path: `public_name`), which the model card shows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

import hfemb
from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import save_atomically

METHODS = ("linear", "slerp")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a model folder's ``model.safetensors`` (single or sharded)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        raise ConfigError(f"{folder}: an adapter folder; merge weights of full models (a training output's merged/)")
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    raise ConfigError(f"{folder}: no model.safetensors (or sharded index) to merge")


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of two fp32 tensors seen as vectors; linear when nearly (anti)parallel."""
    va, vb = a.flatten(), b.flatten()
    na, nb = va.norm(), vb.norm()
    if na < eps or nb < eps:
        return (1 - alpha) * a + alpha * b
    cos = torch.clamp((va @ vb) / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    if float(torch.sin(omega)) < 1e-4:
        return (1 - alpha) * a + alpha * b
    s = torch.sin(omega)
    return (torch.sin((1 - alpha) * omega) / s) * a + (torch.sin(alpha * omega) / s) * b


def merge_state_dicts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float,
                      method: str = "linear", consume: bool = False,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Per tensor, in fp32: ``alpha = 0`` is the base, ``alpha = 1`` the tuned model; integer tensors (ids,
    buffers) come from the tuned model, and integer buffers only the base saved (e.g. BERT's
    ``embeddings.position_ids``) are left out. Output tensors keep the tuned model's dtype, or ``dtype``.
    ``consume``: empty both inputs tensor by tensor, so that peak memory is the two inputs, not the inputs plus
    the output."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a number, got {alpha!r}")
    missing = sorted(set(tuned) - set(base))
    extra = sorted(k for k in set(base) - set(tuned) if base[k].is_floating_point())  # int buffers (position_ids)
    if missing or extra:  # a base-only integer buffer that the tuned checkpoint does not save is left out
        raise HfembError(f"base and tuned models differ in tensors: only in tuned {missing[:5]}, only in base {extra[:5]}")
    merged = {}
    for name in list(tuned):
        t, b = tuned[name], base[name]
        if consume:
            del tuned[name], base[name]
        if b.shape != t.shape:
            raise HfembError(f"tensor {name}: base shape {tuple(b.shape)} vs tuned {tuple(t.shape)}")
        merged[name] = interpolate_tensor(b, t, alpha, method, dtype)
    return merged


def interpolate_tensor(base: torch.Tensor, tuned: torch.Tensor, alpha: float, method: str = "linear",
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of `merge_state_dicts`: computed in fp32, stored in ``dtype`` (default the tuned tensor's); an
    integer tensor is the tuned one."""
    if not tuned.is_floating_point():
        return tuned.clone()
    a32, t32 = base.float(), tuned.float()
    out = (1 - alpha) * a32 + alpha * t32 if method == "linear" else slerp(a32, t32, alpha)
    return out.to(dtype or tuned.dtype).contiguous()


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform fp32 average of checkpoints with the same tensors (integer tensors from the last one)."""
    if not states:
        raise HfembError("no checkpoints to average")
    last = states[-1]
    out = {}
    for name, t in last.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        out[name] = (sum(s[name].float() for s in states) / len(states)).to(t.dtype).contiguous()
    return out


PROVENANCE_FILE = "hfemb_merge.json"  # what `merge_weights` did, read by the model card
AVERAGING_FILE = "hfemb_averaging.json"  # in a merged/ that is a checkpoint average (hfemb.training.averaging)
# the tuned model's card, threshold and provenance describe the tuned weights, not the merged ones
_NOT_COPIED = ("README.md", "hfemb_threshold.json", PROVENANCE_FILE, AVERAGING_FILE, "merge.json")


def public_name(spec: str | os.PathLike) -> str:
    """How a model is named in a provenance file: a Hub id as given; a local folder relative to the working
    directory when inside it, else by its last path parts (``run1/merged``): never an absolute (home) path."""
    text = str(spec)
    if not os.path.exists(text) and not os.path.isabs(text) and not text.startswith(("~", ".")):
        return text  # a Hub id (or a name the user gave)
    path = Path(os.path.abspath(os.path.expanduser(text)))
    try:
        rel = path.relative_to(Path.cwd().resolve())
        if str(rel) != ".":
            return rel.as_posix()
    except ValueError:
        pass
    parts = path.parts[-2:] if path.name in ("merged", "adapter") else path.parts[-1:]
    return "/".join(parts) or path.name


def write_model_folder(template: str | os.PathLike, state: dict[str, torch.Tensor], output: str | os.PathLike,
                       extra_json: dict[str, dict] | None = None) -> None:
    """``output`` = the model folder ``template`` (tokenizer, config, sentence-transformers files; not its card or
    threshold) with ``state`` as its weights (one ``model.safetensors``) and ``extra_json`` files, replaced
    atomically (``output`` may be ``template``)."""
    from safetensors.torch import save_file

    template = Path(template)

    def write(folder: str) -> None:
        tmp = Path(folder)
        for item in template.iterdir():
            if item.name in _WEIGHT_FILES or item.name in _NOT_COPIED or (
                    item.name.startswith("model-") and item.suffix == ".safetensors"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    save_atomically(write, output)  # the old folder is renamed away only once the new one is complete


def merge_record(method: str, alpha: float, base_name: str, tuned_name: str, tensors: int,
                 averaged: dict | None = None) -> dict:
    """The ``hfemb_merge.json`` content: method, alpha, the models through `public_name`, and the tuned model's
    checkpoint averaging when it was one (``averaged``: its ``hfemb_averaging.json``)."""
    record = {"method": method, "alpha": alpha, "base": public_name(base_name), "tuned": public_name(tuned_name),
              "tensors": tensors, "rule": "(1 - alpha) * base + alpha * tuned, per tensor in fp32"
              if method == "linear" else "spherical interpolation per tensor in fp32",
              "hfemb_version": hfemb.__version__}
    if averaged:  # the tuned model was itself a checkpoint average
        record["tuned_checkpoint_averaging"] = {k: averaged.get(k) for k in ("k", "steps")}
    return record


def check_merge_output(base: str | os.PathLike, tuned: str | os.PathLike, output: str | os.PathLike) -> None:
    """The merged folder must be neither input (it is replaced atomically)."""
    if Path(output).resolve() in (Path(tuned).resolve(), Path(base).resolve()):
        raise ConfigError("--output must differ from --base and --tuned")


def merge_weights(base: str | os.PathLike, tuned: str | os.PathLike, output: str | os.PathLike, alpha: float,
                  method: str = "linear", names: tuple[str, str] | None = None, chosen_on: dict | None = None,
                  states: tuple[dict, dict] | None = None) -> dict:
    """Write ``output``: the tuned folder with merged weights (atomically) and ``hfemb_merge.json``; returns the
    record. ``names``: how the base and tuned models were given (default: the folders), recorded through
    `public_name`. ``chosen_on``: how alpha was chosen on a dev set (`hfemb.training.base_merge_sweep`), recorded;
    ``states``: the folders' (base, tuned) state dicts already loaded for that choice (emptied here)."""
    tuned, base, output = Path(tuned), Path(base), Path(output)
    check_merge_output(base, tuned, output)
    base_state, tuned_state = states or (load_state_dict(base), load_state_dict(tuned))
    merged = merge_state_dicts(base_state, tuned_state, alpha, method, consume=True)
    base_name, tuned_name = names or (str(base), str(tuned))
    record = merge_record(method, alpha, base_name, tuned_name, len(merged), read_merge_record(tuned, AVERAGING_FILE))
    if chosen_on:
        record["chosen_on"] = chosen_on
    write_model_folder(tuned, merged, output, {PROVENANCE_FILE: record})
    return record


def read_merge_record(folder: str | os.PathLike, name: str = PROVENANCE_FILE) -> dict | None:
    """The ``hfemb_merge.json`` of a model folder written by `merge_weights` (or another provenance file
    ``name``, e.g. ``AVERAGING_FILE``), or None."""
    path = Path(folder, name)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HfembError(f"{path}: cannot read JSON: {exc}") from None
    return record if isinstance(record, dict) else None
