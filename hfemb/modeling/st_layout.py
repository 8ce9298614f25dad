"""The sentence-transformers folder layout hfemb reads and writes: ``modules.json`` (Transformer, Pooling,
Normalize), ``1_Pooling/config.json``, ``2_Normalize/``, ``config_sentence_transformers.json`` (prompts) and
``sentence_bert_config.json`` (max length); plus reading any JSON file of a local folder or cached Hub repo."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hfemb.errors import HfembError
from hfemb.io_utils import write_json

ST_POOLING = {"lasttoken": "last", "mean": "mean", "cls": "cls"}  # sentence-transformers mode -> hfemb pooling
ST_MODULES = ("Transformer", "Pooling", "Normalize")  # the modules hfemb can load


def read_model_json(name_or_path: str, filename: str, revision: str | None = None) -> dict | list | None:
    """A JSON file of a local folder or a (cached) Hub repository; None when absent."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
    else:
        from transformers.utils import cached_file  # lazy: this module stays light (hfemb.testing.tiny, publishing)

        try:
            path = cached_file(name_or_path, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def st_pooling(name_or_path: str) -> str | None:
    """The pooling ("last", "mean" or "cls") a sentence-transformers folder or Hub repository declares in its
    ``modules.json`` + Pooling config; None without ``modules.json``; ``HfembError`` for modules or pooling
    modes hfemb does not support."""
    modules = read_model_json(name_or_path, "modules.json")
    if not modules:
        return None
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in ST_MODULES:
            raise HfembError(f"{name_or_path}: sentence-transformers module {module.get('type')!r} is not supported "
                             f"by hfemb (only {', '.join(ST_MODULES)})")
        if kind != "Pooling":
            continue
        cfg = read_model_json(name_or_path, f"{module.get('path', '1_Pooling')}/config.json") or {}
        modes = cfg.get("pooling_mode") or [key for key, on in (
            ("lasttoken", cfg.get("pooling_mode_lasttoken")), ("mean", cfg.get("pooling_mode_mean_tokens")),
            ("cls", cfg.get("pooling_mode_cls_token")), ("max", cfg.get("pooling_mode_max_tokens")),
            ("mean_sqrt_len_tokens", cfg.get("pooling_mode_mean_sqrt_len_tokens")),
            ("weightedmean", cfg.get("pooling_mode_weightedmean_tokens"))) if on] or ["mean"]
        modes = [modes] if isinstance(modes, str) else list(modes)
        if len(modes) != 1 or modes[0] not in ST_POOLING:
            raise HfembError(f"{name_or_path}: pooling {modes} is not supported by hfemb (last, mean or cls)")
        return ST_POOLING[modes[0]]
    return None


def write_st_files(folder: str | os.PathLike, *, dim: int, pooling: str, query_prompt: str, document_prompt: str,
                   max_length: int, named_prompts: dict[str, str] | None = None) -> None:
    """Write the sentence-transformers files (not the backbone or tokenizer) into ``folder``: Transformer ->
    Pooling (``pooling``: last, mean or cls; ``dim``: the hidden size) -> Normalize, with the query and document
    prompts (and ``named_prompts``, more query prompts by name: ``encode(..., prompt_name=name)``) and the
    maximum sequence length."""
    folder = Path(folder)
    write_json(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": pooling == "last",
        "include_prompt": True,
    })
    (folder / "2_Normalize").mkdir(exist_ok=True)
    write_json(folder / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "prompts": {"query": query_prompt, **(named_prompts or {}), "document": document_prompt},
        "default_prompt_name": None, "similarity_fn_name": "cosine",
    })
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
