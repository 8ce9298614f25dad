"""Export: atomic model folders and merging a LoRA adapter onto its base.

A merged folder is a plain full model in the sentence-transformers layout with no ``adapter_config.json``
(loaders would otherwise re-attach the adapter).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from hfemb.errors import HfembError


def save_atomically(write: Callable[[str], None], target: str | os.PathLike) -> Path:
    """Call ``write(tmp_dir)`` and move the finished folder to ``target`` (replacing it); on error the
    target is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(str(tmp))
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        os.chmod(target, 0o755)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def merge_adapter_folder(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *, torch_dtype: str = "float32",
                         trust_remote_code: bool = False) -> Path:
    """Load ``adapter_dir`` on its base model (unquantized), merge, and save a plain model to ``output_dir``."""
    from hfemb.modeling import load_embedding_model

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise HfembError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if base and Path(base, "config.json").exists():
        if json.loads(Path(base, "config.json").read_text()).get("quantization_config"):
            raise HfembError(f"{base}: the base model is quantized; merging into 4/8-bit weights loses precision. "
                             "Point the adapter at the unquantized base (adapter_config.json base_model_name_or_path).")
    model = load_embedding_model(str(adapter_dir), torch_dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return save_atomically(lambda d: model.save_pretrained(d, merged=True), output_dir)
