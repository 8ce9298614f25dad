"""``EvalSettings``: everything that shapes an evaluation run besides the models and files (checked on creation,
recorded in results.json); shared by ``hfemb.evaluation.evaluate`` and ``hfemb.evaluation.encoders``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hfemb.errors import ConfigError
from hfemb.evaluation import metrics
from hfemb.modeling.dtypes import check_dtype


@dataclass
class EvalSettings:
    """Everything that shapes an evaluation run besides the models and files (recorded in results.json)."""

    thresholds: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6, 0.7])
    label_threshold: int = 1  # a pair is relevant when label >= this (KUAKE-QQR: 2)
    data_format: str = "auto"
    on_error: str = "raise"  # bad data rows: "raise" or "skip" (counted in the report)
    bad_label: str = "error"  # rows with a label such as "NA": "error" (see on_error) or "skip"
    instruction: str | bool | None = None  # None: each model's default; str: task for all; False: no prompt
    symmetric: bool = False  # documents get the query prompt too
    # a query prompt saved with every model by name (config_sentence_transformers.json "prompts", e.g. one
    # dataset's instruction of training's data.train_files); exclusive with instruction
    prompt_name: str | None = None
    pooling: str | None = None
    dtype: str = "auto"  # bf16 on a bf16 GPU, fp32 on CPU
    quantization: str | None = None  # "4bit" | "8bit" (bitsandbytes, CUDA)
    padding_free: bool | str | None = None  # packed batches (hfemb.modeling.packing): auto (None) | true | false
    device: str | None = None
    max_length: int = 512
    truncate_dim: int | None = None
    batch_size: int = 32
    max_tokens_per_batch: int | None = 16384  # batches by token budget, texts sorted by length
    trust_remote_code: bool = False
    cache_dir: str | None = None
    use_cache: bool = True
    n_bootstrap: int = 1000
    # the threshold to deploy, chosen on dev (else on eval): bagged = median of the best-F1 thresholds of
    # threshold_bags query resamples (metrics.bagged_threshold); best = the argmax of the F1 curve itself
    threshold_rule: Literal["bagged", "best"] = "bagged"
    threshold_bags: int = 200
    seed: int = 0
    api_key_env: str = "OPENAI_API_KEY"
    request_batch_size: int = 64  # texts per request to an OpenAI-compatible endpoint
    skip_failed: bool = False  # a model that fails to load/encode is reported and skipped
    plots: bool = True
    show_progress: bool = True
    # corpus retrieval top-k: exact blocked search (torch), FAISS IndexFlatIP (exact, optional faiss package)
    # or FAISS HNSW (approximate); hfemb.evaluation.faiss_search
    search: Literal["exact", "faiss", "faiss-hnsw"] = "exact"

    def __post_init__(self):
        if isinstance(self.thresholds, str):
            self.thresholds = metrics.parse_thresholds(self.thresholds)
        self.thresholds = sorted(float(t) for t in self.thresholds)
        if not self.thresholds:
            raise ConfigError("thresholds: none given")
        if self.threshold_rule not in ("bagged", "best"):
            raise ConfigError(f"threshold_rule must be bagged or best, got {self.threshold_rule!r}")
        for name in ("batch_size", "max_length", "n_bootstrap", "request_batch_size", "threshold_bags"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "n_bootstrap" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_tokens_per_batch is not None and (not isinstance(self.max_tokens_per_batch, int)
                                                      or self.max_tokens_per_batch < 1):
            raise ConfigError(f"max_tokens_per_batch must be a positive integer, got {self.max_tokens_per_batch!r}")
        check_dtype(self.dtype)
        if self.prompt_name is not None and self.instruction is not None:
            raise ConfigError("give prompt_name (--prompt-name) or instruction (--instruction / --no-instruction), "
                              "not both")
        if self.search not in ("exact", "faiss", "faiss-hnsw"):
            raise ConfigError(f"search must be exact, faiss or faiss-hnsw, got {self.search!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise ConfigError(f"quantization must be 4bit or 8bit, got {self.quantization!r}")
        from hfemb.modeling.packing import parse_padding_free  # here: importing it loads torch

        self.padding_free = parse_padding_free(self.padding_free, "padding_free")
