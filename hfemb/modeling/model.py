"""`EmbeddingModel`: a Hugging Face backbone + pooling + prompts, saved in the sentence-transformers layout.

`hfemb.modeling.loading.load_embedding_model` accepts a Hub id (e.g. ``Qwen/Qwen3-Embedding-0.6B``; from the
local cache when offline), a local folder, or a LoRA adapter folder (loaded on its ``base_model_name_or_path``).
Pooling, prompts and the maximum length come from the folder's sentence-transformers files when it has them
(a model's own ``document``/``passage`` prompt is kept; Qwen3-Embedding's is empty).

`EmbeddingModel.save_pretrained` writes a folder that ``SentenceTransformer(folder)`` encodes identically
(queries with ``prompt_name="query"``): when hfemb appends the end token itself, the saved tokenizer.json
is made to append it too. ``truncate_dim`` is not saved (pass it again when loading).

Numerics: the backbone runs in the dtype it was loaded in; pooling, Matryoshka truncation and
L2-normalisation run in fp32, so embeddings are always fp32. fp16 overflows on Qwen3-Embedding-8B: use
bf16 there.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import BatchEncoding

from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import temporary_folder_beside
from hfemb.modeling.st_layout import write_st_files
from hfemb.modeling.packing import packed_forward
from hfemb.modeling.pooling import (CHUNK_OVERHEAD_TOKENS, POOLINGS, length_chunking_is_exact, length_chunks, pool,
                                    text_config)

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
                 "adapter_model.bin")


class EmbeddingModel(torch.nn.Module):
    """Backbone -> pooling -> optional Matryoshka truncation -> L2 normalisation (fp32).

    ``query_prompt`` / ``document_prompt`` are full prefixes ("" = none); ``named_prompts`` more query prompts by
    name (e.g. one per training dataset), saved beside them for ``SentenceTransformer.encode(...,
    prompt_name=name)`` and read back by `load_embedding_model`. ``append_eos`` appends
    ``eos_token_id_to_append`` after truncation (the tokenizer does not add it itself).
    ``max_length`` caps every ``max_length`` passed to `tokenize` / `encode`.
    """

    def __init__(self, backbone, tokenizer, *, pooling: str, query_prompt: str = "", document_prompt: str = "",
                 append_eos: bool = False, eos_token_id_to_append: int | None = None, normalize: bool = True,
                 truncate_dim: int | None = None, max_length: int | None = None, name_or_path: str | None = None,
                 named_prompts: dict[str, str] | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        if append_eos and eos_token_id_to_append is None:
            raise ConfigError("append_eos needs eos_token_id_to_append")
        self.backbone, self.tokenizer, self.pooling = backbone, tokenizer, pooling
        self.query_prompt, self.document_prompt = query_prompt or "", document_prompt or ""
        self.named_prompts: dict[str, str] = dict(named_prompts or {})
        self.append_eos, self.eos_token_id_to_append = bool(append_eos), eos_token_id_to_append
        self.normalize, self.truncate_dim, self.name_or_path = normalize, truncate_dim, name_or_path
        self.max_length = max_length or _model_max_length(backbone.config, tokenizer)
        # 0: one backbone call per batch, padded to its longest row -- where chunking would change the embeddings
        # (absolute positions with left padding), and under ZeRO-3/FSDP, where every backbone call is a
        # collective that all processes must make equally often (MultiNegEmbeddingTrainer sets it)
        exact = length_chunking_is_exact(backbone.config, getattr(tokenizer, "padding_side", "right"))
        self.chunk_overhead_tokens = CHUNK_OVERHEAD_TOKENS if exact else 0
        self.padding_free = False  # True: packed batches (hfemb.modeling.packing), no padding, no length chunks
        if getattr(backbone, "hf_device_map", None) is not None:
            self.hf_device_map = backbone.hf_device_map  # lets Trainer see a model-parallel placement

    # ---- properties ------------------------------------------------------------------------
    @property
    def config(self):
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    @property
    def embedding_dim(self) -> int:
        return self.truncate_dim or text_config(self.config).hidden_size

    @property
    def is_peft(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] ids and mask -> [B, D] fp32 embeddings (unit length when ``normalize``).

        Rows of very different lengths run in length chunks (`length_chunks`), each cut to its own
        longest row, so little compute goes to padding; the result does not depend on the chunking up to float
        rounding (padding is masked; rotary positions only shift by a constant under left padding). Chunking is
        off (``chunk_overhead_tokens = 0``) where it would not be exact (`length_chunking_is_exact`) and under
        ZeRO-3/FSDP, where the number of backbone calls must not depend on the data.
        With ``padding_free`` the texts are packed instead (`hfemb.modeling.packing`): one backbone call."""
        if self.padding_free:
            emb = packed_forward(self.backbone, input_ids, attention_mask, self.pooling, _pad_id(self.tokenizer))
            if self.truncate_dim:
                emb = emb[:, : self.truncate_dim]
            return torch.nn.functional.normalize(emb, p=2, dim=-1) if self.normalize else emb
        lengths = attention_mask.sum(dim=1)  # [B]
        chunks = length_chunks(lengths.tolist(), self.chunk_overhead_tokens) if self.chunk_overhead_tokens else None
        if not chunks or len(chunks) == 1:
            emb = self._embed(input_ids, attention_mask)
        else:
            # one embedding lookup for all rows: one (dense, vocabulary-sized) embedding gradient, not one per chunk
            inputs = self.backbone.get_input_embeddings()(input_ids)  # [B, T, H]
            parts, order = [], []
            for rows in chunks:
                index = torch.tensor(rows, device=input_ids.device)
                x, mask = inputs.index_select(0, index), attention_mask.index_select(0, index)  # [b, T, H], [b, T]
                real = mask.any(dim=0).nonzero()  # columns holding a real token of some row of the chunk
                if len(real):
                    x, mask = x[:, int(real[0]):int(real[-1]) + 1], mask[:, int(real[0]):int(real[-1]) + 1]
                parts.append(self._embed(None, mask, inputs_embeds=x))
                order.extend(rows)
            emb = torch.cat(parts).index_select(0, torch.tensor(order, device=input_ids.device).argsort())
        return emb

    def _embed(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        emb = pool(out[0], attention_mask, self.pooling)  # [B, H] fp32
        if self.truncate_dim:
            emb = emb[:, : self.truncate_dim]
        return torch.nn.functional.normalize(emb, p=2, dim=-1) if self.normalize else emb

    # ---- tokenisation ----------------------------------------------------------------------
    def _effective_max_length(self, max_length: int | None) -> int:
        limit = min(max_length, self.max_length) if max_length else self.max_length
        if limit < 1 + int(self.append_eos):
            raise ConfigError(f"max_length must be at least {1 + int(self.append_eos)}, got {max_length}")
        return limit

    def token_ids(self, texts: list[str], *, is_query: bool, max_length: int | None,
                  prompts: list[str | None] | None = None) -> list[list[int]]:
        """Unpadded ids: prompt + text, truncated, end token appended when ``append_eos``. ``prompts``: one
        prompt per text (None = the model's query/document prompt), e.g. each training row's dataset instruction."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
        prompt = self.query_prompt if is_query else self.document_prompt
        if prompts is not None:
            if len(prompts) != len(texts):
                raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts")
            texts = [(prompt if p is None else p) + t for p, t in zip(prompts, texts)]
        else:
            texts = [prompt + t for t in texts] if prompt else list(texts)
        limit = self._effective_max_length(max_length)
        if not texts:
            return []
        if not self.append_eos:
            return self.tokenizer(texts, truncation=True, max_length=limit, return_attention_mask=False,
                                  return_token_type_ids=False)["input_ids"]
        rows = self.tokenizer(texts, truncation=True, max_length=limit - 1, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]
        return [row + [self.eos_token_id_to_append] for row in rows]

    def pad(self, rows: list[list[int]]) -> BatchEncoding:
        """Pad to the longest row on ``tokenizer.padding_side``; returns input_ids and attention_mask."""
        side = self.tokenizer.padding_side
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # [B]
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True,
            padding_value=_pad_id(self.tokenizer), padding_side=side)  # [B, T]
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)  # [1, T]
        if side == "left":
            attention_mask = positions >= (input_ids.shape[1] - lengths).unsqueeze(1)
        else:
            attention_mask = positions < lengths.unsqueeze(1)
        return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask.to(torch.long)})

    def tokenize(self, texts: list[str], *, is_query: bool, max_length: int,
                 prompts: list[str | None] | None = None) -> BatchEncoding:
        """Prompt (per text with ``prompts``, see `token_ids`), truncation (the appended end token survives it)
        and padding to the longest text."""
        return self.pad(self.token_ids(texts, is_query=is_query, max_length=max_length, prompts=prompts))

    # ---- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: list[str], *, is_query: bool, batch_size: int = 32, max_length: int | None = 512,
               max_tokens_per_batch: int | None = None, show_progress: bool = False,
               convert_to_numpy: bool = True, prompts: list[str | None] | None = None,
               on_batch=None) -> np.ndarray | torch.Tensor:
        """[N, D] fp32 embeddings in input order. Texts are tokenised once, sorted longest first and
        batched by ``batch_size`` rows and, if given, ``max_tokens_per_batch`` padded tokens. ``prompts``: one
        prompt per text (see `token_ids`). ``on_batch(indices, vectors)``, if given, is called after each batch
        with the input positions of its texts and their [b, D] fp32 CPU vectors (progress, saving as it goes);
        the result does not change."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of texts, not one string")
        rows = self.token_ids(list(texts), is_query=is_query, max_length=max_length, prompts=prompts)
        out = torch.empty(len(rows), self.embedding_dim, dtype=torch.float32)
        batches = _length_batches([len(r) for r in rows], batch_size, max_tokens_per_batch)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        was_training, device = self.training, self.device
        self.eval()
        try:
            for batch in batches:
                enc = self.pad([rows[i] for i in batch])
                emb = self(enc["input_ids"].to(device), enc["attention_mask"].to(device))
                emb = emb.float().cpu()
                out[torch.tensor(batch)] = emb
                if on_batch is not None:
                    on_batch(batch, emb)
        finally:
            self.train(was_training)
        return out.numpy() if convert_to_numpy else out

    # ---- training helpers ------------------------------------------------------------------
    def _hf_model(self):
        return self.backbone.get_base_model() if self.is_peft else self.backbone

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Checkpoint the backbone's layers (``use_reentrant=False`` unless given); with peft the input
        embeddings are made to require grads so gradients reach the LoRA weights."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        model = self._hf_model()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                  every_n_layers=every_n_layers, offload=offload)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.is_peft:
            model.disable_input_require_grads()
            model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        model = self._hf_model()
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()

    # ---- saving ----------------------------------------------------------------------------
    def save_pretrained(self, output_dir: str | os.PathLike, *, safe_serialization: bool = True,
                        merged: bool = False) -> None:
        """Write the sentence-transformers layout: backbone (a peft backbone: the adapter only, or with
        ``merged=True`` a merged copy without adapter files -- needs memory for a second copy), tokenizer,
        modules.json, 1_Pooling/config.json, config_sentence_transformers.json, sentence_bert_config.json.
        Written to a temporary folder first; each finished file then replaces its namesake in
        ``output_dir`` (other files there are kept, stale weight/adapter files removed)."""
        output_dir = Path(output_dir)
        with temporary_folder_beside(output_dir) as tmp:
            backbone = self.backbone
            if merged and self.is_peft:
                if getattr(self._hf_model(), "is_quantized", False):
                    raise HfembError("cannot merge a LoRA adapter into 4/8-bit weights: save the adapter and merge "
                                     "it onto the unquantized base (hfemb.training.merging.merge_adapter)")
                backbone = copy.deepcopy(self.backbone).merge_and_unload()
            backbone.save_pretrained(str(tmp), safe_serialization=safe_serialization)
            self.tokenizer.save_pretrained(str(tmp))
            if self.append_eos:
                _bake_eos_into_tokenizer_json(tmp, self.eos_token_id_to_append, self.tokenizer)
            self._write_sentence_transformers_files(tmp)
            _move_into(tmp, output_dir)

    def _write_sentence_transformers_files(self, folder: Path) -> None:
        write_st_files(folder, dim=text_config(self.config).hidden_size, pooling=self.pooling,
                       query_prompt=self.query_prompt, document_prompt=self.document_prompt,
                       max_length=self.max_length, named_prompts=self.named_prompts)

    def prompt(self, name: str) -> str:
        """The prompt saved under ``name``: "query", "document" (or "passage"), or one of ``named_prompts``."""
        if name == "query":
            return self.query_prompt
        if name in ("document", "passage"):
            return self.document_prompt
        if name not in self.named_prompts:
            raise ConfigError(f"{self.name_or_path}: no prompt named {name!r}; its prompts are "
                              f"{', '.join(['query', 'document', *self.named_prompts])}")
        return self.named_prompts[name]


def _model_max_length(config, tokenizer) -> int:
    limits = [getattr(text_config(config), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < 10**7]
    return min(limits) if limits else 512


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def _length_batches(lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped longest first: at most ``batch_size`` rows and ``max_tokens`` padded tokens each."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ConfigError(f"batch_size and max_tokens_per_batch must be >= 1, got {batch_size}, {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the first row is the longest
        if current and (len(current) >= batch_size or (max_tokens and (len(current) + 1) * width > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _move_into(src: Path, dst: Path) -> None:
    """Move the finished files of ``src`` into ``dst`` (a rename when ``dst`` does not exist)."""
    if not dst.exists():
        os.replace(src, dst)
        os.chmod(dst, 0o755)  # mkdtemp made it 0700
        return
    for name in _WEIGHT_FILES:
        stale = dst / name
        if stale.exists() and not (src / name).exists():
            stale.unlink()
    for stale in dst.glob("model-*-of-*.safetensors"):
        if not (src / stale.name).exists():
            stale.unlink()
    for item in src.iterdir():
        target = dst / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)


def _bake_eos_into_tokenizer_json(folder: Path, eos_id: int, tokenizer) -> None:
    """Make the saved fast tokenizer append ``eos_id`` itself, so sentence-transformers (and a reload)
    see the same ids as `EmbeddingModel.tokenize`."""
    path = folder / "tokenizer.json"
    if not path.exists():
        logger.warning("%s: no tokenizer.json; loaders other than hfemb will not append the end token", folder)
        return
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_file(str(path))
    token = tokenizer.convert_ids_to_tokens(eos_id)
    append = processors.TemplateProcessing(single=f"$A:0 {token}:0", pair=f"$A:0 {token}:0 $B:1 {token}:1",
                                           special_tokens=[(token, eos_id)])
    old = backend.post_processor
    backend.post_processor = append if old is None else processors.Sequence([old, append])
    backend.save(str(path))
