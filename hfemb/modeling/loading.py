"""`load_embedding_model`: a Hub id, folder or LoRA adapter -> `EmbeddingModel` (dtype, pooling, prompts)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from hfemb.errors import ConfigError, HfembError
from hfemb.modeling.dtypes import check_dtype
from hfemb.modeling.model import EmbeddingModel
from hfemb.modeling.packing import resolve_padding_free
from hfemb.modeling.pooling import POOLINGS, text_config
from hfemb.modeling.st_layout import read_model_json, st_pooling

logger = logging.getLogger(__name__)

QWEN3_WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"
DECODER_MODEL_TYPES = {
    "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "gpt2", "gpt_neox", "falcon", "olmo", "olmo2", "granite", "internlm2", "deepseek_v3",
}


def format_instruction(task: str, text: str) -> str:
    """Qwen3-Embedding's query format (no space after ``Query:``)."""
    return f"Instruct: {task}\nQuery:{text}"


def _is_decoder(config) -> bool:
    config = text_config(config)
    archs = getattr(config, "architectures", None) or []
    return bool(getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in archs)
                or getattr(config, "model_type", None) in DECODER_MODEL_TYPES)


def _st_prompts(sources: list[str]) -> tuple[dict[str, str], str]:
    """The ``prompts`` of the first source (the adapter folder first, then its base) whose
    config_sentence_transformers.json has any, and its ``default_prompt_name``."""
    st_config: dict[str, Any] = {}
    for source in sources:
        st_config = read_model_json(source, "config_sentence_transformers.json") or {}
        if st_config.get("prompts"):
            break
    return st_config.get("prompts") or {}, st_config.get("default_prompt_name") or ""


def _named_prompts(sources: list[str]) -> dict[str, str]:
    """The saved prompts other than query / document / passage (e.g. one per dataset of ``data.train_files``)."""
    prompts, _ = _st_prompts(sources)
    return {k: v for k, v in prompts.items() if k not in ("query", "document", "passage") and isinstance(v, str)}


def resolve_prompts(sources: list[str], query_instruction, symmetric: bool) -> tuple[str, str]:
    """(query prompt, document prompt) from the sources' sentence-transformers prompts and ``query_instruction``
    (see `load_embedding_model`)."""
    prompts, default_name = _st_prompts(sources)
    default = prompts.get(default_name, "")
    document = prompts.get("document", prompts.get("passage", default))
    if query_instruction is None:
        if "query" in prompts or default:
            query = prompts.get("query", default)
        elif any("qwen3-embedding" in s.lower() for s in sources):
            query = format_instruction(QWEN3_WEB_SEARCH_TASK, "")
        else:
            query = ""
    elif query_instruction is True:  # "use an instruction": the model's default
        return resolve_prompts(sources, None, symmetric)
    elif query_instruction is False or query_instruction == "":
        query = ""
    elif isinstance(query_instruction, str):
        query = format_instruction(query_instruction, "")
    else:
        raise ConfigError(f"query_instruction must be None, a task string or False, got {query_instruction!r}")
    return query, (query if symmetric else document)


def _torch_dtype(name: str):
    check_dtype(name, "torch_dtype")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _quantization_config(quantization: str | None, dtype):
    if quantization is None:
        return None
    if quantization not in ("4bit", "8bit"):
        raise ConfigError(f"quantization must be '4bit', '8bit' or None, got {quantization!r}")
    if not torch.cuda.is_available():
        raise HfembError(f"{quantization} quantization (bitsandbytes, QLoRA) needs a CUDA GPU; none is available")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise HfembError("quantization needs bitsandbytes: pip install 'hfemb[qlora]'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _not_found(name_or_path: str, exc: Exception) -> HfembError:
    if os.path.isdir(name_or_path):
        has_config = os.path.isfile(os.path.join(name_or_path, "config.json"))
        return HfembError(f"{name_or_path}: not a model folder (no config.json or adapter_config.json)" if not has_config
                          else f"{name_or_path}: cannot read the model: {str(exc).strip().splitlines()[0][:300]}")
    if os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path) or \
            name_or_path.strip(os.sep).count(os.sep) >= 2:  # a Hub id has one "/"
        return HfembError(f"{name_or_path}: no such model folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    reason = "HF_HUB_OFFLINE is set" if offline else str(exc).strip().splitlines()[0][:200]
    return HfembError(
        f"cannot load model {name_or_path!r}: not a local folder and not in the Hugging Face cache ({reason}); "
        "download it first (`hf download REPO_ID`) or pass a local folder")


def load_embedding_model(name_or_path: str, *, pooling: str | None = None,
                         query_instruction: str | bool | None = None, symmetric: bool = False,
                         torch_dtype: str = "float32", attn_implementation: str | None = "sdpa",
                         trust_remote_code: bool = False, append_eos: bool | None = None,
                         truncate_dim: int | None = None, device: str | None = None, device_map=None,
                         quantization: str | None = None, max_length: int | None = None,
                         padding_free: bool | str | None = False) -> EmbeddingModel:
    """Load a Hub id, a local folder or a LoRA adapter folder as an `EmbeddingModel`.

    * ``pooling``: "last" | "mean" | "cls"; default from the sentence-transformers files, else "last" for
      decoder-only models and "mean" for encoders. "last" pads on the left.
    * ``query_instruction``: None = the model's own query prompt, else Qwen3-Embedding's web-search
      instruction for Qwen3-Embedding models, else none; a task string = ``Instruct: {task}\\nQuery:``;
      False = no prompt. ``symmetric`` gives documents the query prompt too.
    * ``torch_dtype``: float32 | bfloat16 | float16 | auto (bf16 on a CUDA GPU that supports it, else fp32).
      fp16 overflows on Qwen3-Embedding-8B: use bf16.
    * ``append_eos``: None = append the end-of-text token (``<|endoftext|>`` if the vocabulary has it, else
      ``eos_token``) for last-token pooling when the tokenizer does not add one itself; True = also for other
      poolings; False = never. Qwen3-Embedding's tokenizer appends ``<|endoftext|>`` itself.
    * ``quantization``: "4bit" | "8bit" via bitsandbytes (CUDA only).
    * ``max_length``: the model's maximum sequence length (default: sentence_bert_config.json, else the
      tokenizer / position limit).
    * ``padding_free``: "auto" | True | False: packed batches (`hfemb.modeling.packing`); auto = on for
      rotary decoders (Qwen3, Qwen2, Llama, Mistral) whose attention implementation supports them.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if truncate_dim is not None and truncate_dim < 1:
        raise ConfigError(f"truncate_dim must be >= 1, got {truncate_dim}")
    dtype = _torch_dtype(torch_dtype)
    quantization_config = _quantization_config(quantization, dtype)

    adapter_config = read_model_json(name_or_path, "adapter_config.json")
    base_path = name_or_path
    if adapter_config is not None:
        base_path = adapter_config.get("base_model_name_or_path")
        if not base_path:
            raise HfembError(f"{name_or_path}/adapter_config.json: no 'base_model_name_or_path'")
    sources = [name_or_path, base_path] if adapter_config is not None else [name_or_path]
    try:
        config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # ValueError: a folder without config.json / an unknown model_type
        raise _not_found(base_path, exc) from None
    config.use_cache = False  # no KV cache for embedding

    tokenizer_source = next((s for s in sources if read_model_json(s, "tokenizer_config.json") is not None), base_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    model_kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        model_kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
        device_map = device_map or {"": device or torch.cuda.current_device()}
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    try:
        backbone = AutoModel.from_pretrained(base_path, **model_kwargs)
    except OSError as exc:
        raise _not_found(base_path, exc) from None
    except ValueError as exc:  # an architecture without SDPA support: fall back to its default attention
        if not attn_implementation or "attention" not in str(exc).lower():
            raise
        logger.warning("%s: attn_implementation=%r unavailable (%s); using the default", base_path,
                       attn_implementation, exc)
        model_kwargs.pop("attn_implementation")
        backbone = AutoModel.from_pretrained(base_path, **model_kwargs)
    if adapter_config is not None:
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, name_or_path)
    if device_map is None:
        backbone.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone.eval()

    if pooling is None:
        pooling = next((p for p in map(st_pooling, sources) if p), None) or ("last" if _is_decoder(config) else "mean")
    tokenizer.padding_side = "left" if pooling == "last" else "right"
    query_prompt, document_prompt = resolve_prompts(sources, query_instruction, symmetric)
    eos_id = _end_token_id(tokenizer)
    appends_itself = _tokenizer_appends(tokenizer, eos_id)
    do_append = (pooling == "last" if append_eos is None else bool(append_eos)) and not appends_itself
    if do_append and eos_id is None:
        raise HfembError(f"{name_or_path}: append_eos needs an end token, but the tokenizer has none")
    if max_length is None:
        st = next((c for c in (read_model_json(s, "sentence_bert_config.json") for s in sources) if c), {})
        max_length = st.get("max_seq_length")
    hidden = text_config(config).hidden_size
    if truncate_dim is not None and truncate_dim > hidden:
        raise ConfigError(f"truncate_dim {truncate_dim} exceeds the model's dimension {hidden} ({name_or_path})")
    model = EmbeddingModel(backbone, tokenizer, pooling=pooling, query_prompt=query_prompt,
                           document_prompt=document_prompt, append_eos=do_append,
                           eos_token_id_to_append=eos_id if do_append else None, truncate_dim=truncate_dim,
                           max_length=max_length, name_or_path=name_or_path, named_prompts=_named_prompts(sources))
    model.padding_free = resolve_padding_free(padding_free, backbone.config)
    return model


def _end_token_id(tokenizer) -> int | None:
    """``<|endoftext|>`` when the vocabulary has it (checked by round trip: Qwen2Tokenizer's unk token *is*
    ``<|endoftext|>``, other tokenizers map unknown tokens to unk), else ``eos_token_id``."""
    vocab_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if vocab_id is not None and tokenizer.convert_ids_to_tokens(vocab_id) == "<|endoftext|>":
        return int(vocab_id)
    return tokenizer.eos_token_id


def _tokenizer_appends(tokenizer, eos_id: int | None) -> bool:
    """Whether the tokenizer itself ends every text with a special token (probed on a short string)."""
    probe = "hfemb probe"
    with_special = tokenizer(probe)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if len(with_special) <= len(without) or with_special[-1] == without[-1]:
        return False
    return eos_id is None or with_special[-1] in (eos_id, tokenizer.eos_token_id, tokenizer.sep_token_id)
