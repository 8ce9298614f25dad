"""Export: atomic model folders, the base quantization check, model cards for a training output (merging a LoRA
adapter onto its base: `hfemb.training.merging`).

A merged folder is a plain full model in the sentence-transformers layout with no ``adapter_config.json``
(loaders would otherwise re-attach the adapter). Model cards: `hfemb.publishing.model_card`; Hub upload: `hfemb.publishing.hub`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hfemb.errors import HfembError
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
