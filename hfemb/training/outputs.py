"""Export: atomic model folders, merging a LoRA adapter onto its base, model cards for a training output.

A merged folder is a plain full model in the sentence-transformers layout with no ``adapter_config.json``
(loaders would otherwise re-attach the adapter). Model cards: `hfemb.publishing.model_card`; Hub upload: `hfemb.publishing.hub`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hfemb.errors import HfembError
from hfemb.io_utils import save_atomically
from hfemb.modeling.dtypes import DTYPES, check_dtype
from hfemb.modeling.model import load_embedding_model
from hfemb.publishing.model_card import write_model_card

log = logging.getLogger("hfemb.training.outputs")


def base_quantization(base: str, trust_remote_code: bool = False) -> dict | None:
    """The ``quantization_config`` of a base model (local folder or cached Hub id), or None."""
    if os.path.isdir(base):
        path = Path(base, "config.json")
        return json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # not reachable here: load_embedding_model reports it
    quant = getattr(config, "quantization_config", None)
    return quant.to_dict() if hasattr(quant, "to_dict") else quant


def _base_dtype(base: str) -> str:
    """The base checkpoint's own dtype (config.json ``dtype`` / ``torch_dtype``) when it is a float type, else fp32."""
    path = Path(base, "config.json")
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not config:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(base).to_dict()
        except (OSError, ValueError):
            config = {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return dtype if dtype in DTYPES[1:] else "float32"


def merge_adapter_folder(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, *, torch_dtype: str = "float32",
                         trust_remote_code: bool = False) -> Path:
    """Load ``adapter_dir`` on its base model (unquantized), merge, and save a plain model to ``output_dir``
    (replaced atomically). ``torch_dtype="auto"``: the base checkpoint's dtype. A quantized base is refused."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.exists():
        raise HfembError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise HfembError(f"{cfg_file}: no 'base_model_name_or_path' to merge onto")
    if base_quantization(base, trust_remote_code):
        raise HfembError(f"{base}: the base model is quantized; merging into 4/8-bit weights loses precision. "
                         "Point the adapter at the unquantized base (adapter_config.json base_model_name_or_path).")
    check_dtype(torch_dtype)
    if torch_dtype == "auto":
        torch_dtype = _base_dtype(base)
    model = load_embedding_model(str(adapter_dir), torch_dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return save_atomically(lambda d: model.save_pretrained(d, merged=True), output_dir)


def write_model_cards(output_dir: str | os.PathLike, **options) -> list[Path]:
    """``README.md`` model cards in a training output's ``merged/`` and ``adapter/`` (replacing peft's empty
    template). A card that cannot be written is reported as a warning: the trained model is already saved."""
    written = []
    for sub in ("merged", "adapter"):
        folder = Path(output_dir, sub)
        if not folder.is_dir():
            continue
        try:
            write_model_card(folder, output_dir=output_dir, **options)
            written.append(folder / "README.md")
        except (HfembError, OSError) as exc:
            log.warning("%s: model card not written: %s", folder, exc)
    return written
