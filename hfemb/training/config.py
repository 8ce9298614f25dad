"""Training configuration: one JSON file with sections, plus ``section.key=value`` overrides.

Sections: ``model``, ``data``, ``mining`` (optional: mine raw data on the fly), ``lora``, ``loss`` and
``training`` (``transformers.TrainingArguments`` fields, passed through). Unknown keys stop with an error
listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfemb.errors import ConfigError

QWEN3_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FINETUNE_TYPES = ("lora", "qlora", "full")


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen3-Embedding-0.6B"
    finetune_type: str = "lora"  # lora | qlora | full
    pooling: str | None = None  # None: from the model's sentence-transformers config, else last/mean by architecture
    query_instruction: str | None = None  # None: the model's own prompt; "": no instruction; else the task text
    symmetric: bool = False  # instruction on documents too (pair classification, STS)
    torch_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: see hfemb.training.runner.resolve_dtype)
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False
    append_eos: bool | None = None  # None: append the end-of-text token only if the tokenizer does not
    truncate_dim: int | None = None  # Matryoshka: truncate, then normalise
    quantization_bits: int = 4  # qlora only: 4 or 8 (bitsandbytes, needs a CUDA GPU)


@dataclass
class DataConfig:
    train_file: str = ""
    eval_file: str | None = None
    eval_ratio: float = 0.0  # held-out share of training queries when there is no eval_file
    format: str = "auto"
    query_columns: list[str] | None = None  # QA tables: columns joined into the query
    positive_column: str | None = None
    label_threshold: int = 1  # labelled pools: label >= threshold is relevant
    skip_bad_rows: bool = False
    query_max_len: int = 128
    passage_max_len: int = 512
    num_negatives: int = 3
    mine: bool | None = None  # None: mine when rows lack num_negatives negatives; needs no `mining` section


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None  # None: Qwen's q,k,v,o,gate,up,down if present, else all-linear
    bias: str = "none"


@dataclass
class LossConfig:
    temperature: float = 0.05
    in_batch_negatives: bool = True
    mask_duplicates: bool = True  # a candidate with the positive's exact text is never a negative
    mask_false_negatives: bool = False  # also drop candidates scoring above the positive + margin
    false_negative_margin: float = 0.1
    query_negatives: bool = False  # other in-batch queries as negatives (improved contrastive loss)
    document_negatives: bool = False  # positive vs the other in-batch documents (improved contrastive loss)
    # Multi-process training (DDP, DeepSpeed): score each query against the documents of every process
    # (gathered with gradients, hfemb.training.distributed); no effect in one process or without in-batch negatives.
    cross_device_negatives: bool = True
    # Distillation (hfemb.training.distill): + distill_weight * KL(teacher || student) over each row's own
    # candidates, softmax at distill_temperature. None: DEFAULT_DISTILL_WEIGHT when the rows carry teacher
    # scores (`hfemb mine --teacher`, FlagEmbedding's pos_scores/neg_scores), else off; 0: off.
    distill_weight: float | None = None
    distill_temperature: float = 0.05
    # Matryoshka: InfoNCE on each truncated, re-normalised prefix, summed with these weights (default 1 each);
    # list the full dimension too to keep training it (sentence-transformers' MatryoshkaLoss).
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None


DEFAULT_DISTILL_WEIGHT = 1.0  # chosen on WikiQA dev (README, Results): used when rows carry teacher scores


def resolved_distill_weight(loss: LossConfig, rows_have_teacher_scores: bool) -> float:
    """The distillation weight in effect: the configured one, or the default when rows carry teacher scores."""
    if loss.distill_weight is not None:
        return float(loss.distill_weight)
    return DEFAULT_DISTILL_WEIGHT if rows_have_teacher_scores else 0.0


# hfemb's defaults for TrainingArguments (the reference recipe), under the user's `training` section.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "output/run",
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "logging_steps": 10,
    "save_total_limit": 2,
    "seed": 42,
    "report_to": "auto",  # tensorboard when installed
    "dataloader_drop_last": False,
}
# Keys hfemb accepts in `training` although this transformers version spells them differently.
TRAINING_ALIASES = {"warmup_ratio", "gradient_checkpointing", "gradient_checkpointing_kwargs", "group_by_length"}
# hfemb's own keys in `training` (removed before TrainingArguments): rows per forward pass with GradCache
# (hfemb.training.grad_cache); null or 0 = off.
HFEMB_TRAINING_KEYS = {"grad_cache_mini_batch"}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mining: dict[str, Any] | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    training: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the JSON file it came from

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "loss": LossConfig}


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init} | TRAINING_ALIASES | HFEMB_TRAINING_KEYS


def _mining_field_names() -> set[str]:
    from hfemb.mining.mine import MiningConfig

    return {f.name for f in dataclasses.fields(MiningConfig)}


def _check_keys(section: str, given: dict, valid: set[str], where: str) -> None:
    unknown = sorted(set(given) - valid)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} in section '{section}'; "
            f"valid keys: {', '.join(sorted(valid))}"
        )


_ANNOTATION_CHECKS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                      "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                      "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
                      "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                      "None": lambda v: v is None}
_ANNOTATION_NAMES = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false",
                     "list[str]": "a list of strings", "None": "null"}


def check_annotated(section: str, key: str, value: Any, annotation: str, where: str) -> Any:
    """``value`` against a string annotation of simple types (``int | None``, ``list[str] | str`` ...): the
    fields whose default is None, and the eval config; other annotations are not checked. An int for a
    float-only field comes back as a float."""
    kinds = [t.strip() for t in str(annotation).split("|")]
    if not all(k in _ANNOTATION_CHECKS for k in kinds) or any(_ANNOTATION_CHECKS[k](value) for k in kinds):
        return float(value) if "float" in kinds and "int" not in kinds and isinstance(value, int) \
            and not isinstance(value, bool) else value
    name = f"{section}.{key}" if section else key
    raise ConfigError(f"{where}: '{name}' must be {' or '.join(_ANNOTATION_NAMES[k] for k in kinds)}, got {value!r}")


def _coerce(section: str, key: str, value: Any, default: Any, where: str, annotation: str | None = None) -> Any:
    """Light type checking against the dataclass default, or its annotation when the default is None."""
    if default is None and annotation is not None:
        return check_annotated(section, key, value, annotation, where)
    if value is None or default is None:
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: '{section}.{key}' must be true or false, got {value!r}")
    if expected in (int, float, str) and not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{section}.{key}' must be {expected.__name__}, got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a JSON object with sections {sorted(SECTION_TYPES) + ['mining', 'training']}")
    _check_keys("<top level>", raw, set(SECTION_TYPES) | {"mining", "training"}, where)
    cfg = TrainConfig(source=where)
    for name, cls in SECTION_TYPES.items():
        given = raw.get(name) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{where}: section '{name}' must be an object")
        defaults = cls()
        _check_keys(name, given, {f.name for f in dataclasses.fields(cls)}, where)
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {k: _coerce(name, k, v, getattr(defaults, k), where, types[k]) for k, v in given.items()}
        setattr(cfg, name, cls(**values))
    if raw.get("mining") is not None:
        if not isinstance(raw["mining"], dict):
            raise ConfigError(f"{where}: section 'mining' must be an object")
        _check_keys("mining", raw["mining"], _mining_field_names(), where)
        from hfemb.mining.mine import MiningConfig

        fields = {f.name: f for f in dataclasses.fields(MiningConfig)}
        cfg.mining = {k: _coerce("mining", k, v, fields[k].default if fields[k].default is not dataclasses.MISSING
                                 else None, where, fields[k].type) for k, v in raw["mining"].items()}
    training = raw.get("training", {})
    if not isinstance(training, dict):
        raise ConfigError(f"{where}: section 'training' must be an object")
    _check_keys("training", training, _training_argument_names(), where)
    cfg.training = {**TRAINING_DEFAULTS, **training}
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "config") -> None:
    m, d, t = cfg.model, cfg.data, cfg.training
    if not m.name_or_path:
        raise ConfigError(f"{where}: 'model.name_or_path' is required (a Hub id or a local folder)")
    if m.finetune_type not in FINETUNE_TYPES:
        raise ConfigError(f"{where}: 'model.finetune_type' must be one of {', '.join(FINETUNE_TYPES)}, got {m.finetune_type!r}")
    if m.pooling not in (None, "last", "mean", "cls"):
        raise ConfigError(f"{where}: 'model.pooling' must be last, mean or cls, got {m.pooling!r}")
    if m.quantization_bits not in (4, 8):
        raise ConfigError(f"{where}: 'model.quantization_bits' must be 4 or 8, got {m.quantization_bits!r}")
    if m.torch_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: 'model.torch_dtype' must be auto, float32, bfloat16 or float16")
    if not d.train_file:
        raise ConfigError(f"{where}: 'data.train_file' is required")
    if d.eval_ratio is None:
        d.eval_ratio = 0.0  # null: no held-out share
    if isinstance(d.eval_ratio, bool) or not isinstance(d.eval_ratio, (int, float)) or not 0.0 <= d.eval_ratio < 1.0:
        raise ConfigError(f"{where}: 'data.eval_ratio' must be a number in [0, 1), got {d.eval_ratio!r}")
    if d.eval_file and d.eval_ratio:
        raise ConfigError(f"{where}: give 'data.eval_file' or 'data.eval_ratio', not both "
                          "(on the command line: data.eval_file=FILE data.eval_ratio=0)")
    for key in ("query_max_len", "passage_max_len"):
        if getattr(d, key) < 4:
            raise ConfigError(f"{where}: 'data.{key}' must be at least 4, got {getattr(d, key)}")
    if d.num_negatives < 0:
        raise ConfigError(f"{where}: 'data.num_negatives' must be >= 0")
    if (d.query_columns is None) != (d.positive_column is None):
        raise ConfigError(f"{where}: give both 'data.query_columns' and 'data.positive_column', or neither")
    if (cfg.loss.query_negatives or cfg.loss.document_negatives) and not cfg.loss.in_batch_negatives:
        raise ConfigError(f"{where}: 'loss.query_negatives' / 'loss.document_negatives' need 'loss.in_batch_negatives'")
    if cfg.loss.temperature <= 0:
        raise ConfigError(f"{where}: 'loss.temperature' must be > 0, got {cfg.loss.temperature}")
    _check_distill_matryoshka(cfg.loss, where)
    if cfg.lora.r <= 0:
        raise ConfigError(f"{where}: 'lora.r' must be > 0")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"{where}: 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.lora.bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"{where}: 'lora.bias' must be none, all or lora_only, got {cfg.lora.bias!r}")
    if t.get("remove_unused_columns"):
        raise ConfigError(f"{where}: 'training.remove_unused_columns' must stay false (the collator needs every field)")
    if t.get("bf16") and t.get("fp16"):
        raise ConfigError(f"{where}: 'training.bf16' and 'training.fp16' are exclusive")
    if not t.get("output_dir"):
        raise ConfigError(f"{where}: 'training.output_dir' is required")
    _check_training_values(t, where)
    from hfemb.publishing.hub import push_settings

    try:
        push_settings(t)  # refuses hub_token in files, needs hub_model_id with push_to_hub
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    mini_batch = t.get("grad_cache_mini_batch")
    if mini_batch is not None and (isinstance(mini_batch, bool) or not isinstance(mini_batch, int) or mini_batch < 0):
        raise ConfigError(f"{where}: 'training.grad_cache_mini_batch' must be a whole number of rows >= 1 "
                          f"(or 0/null for off), got {mini_batch!r}")
    if mini_batch and t.get("deepspeed"):
        raise ConfigError(f"{where}: 'training.grad_cache_mini_batch' does not work with DeepSpeed (accelerate steps "
                          "its engine after each backward call); use ZeRO without GradCache, or DDP with GradCache")


def _check_distill_matryoshka(loss: LossConfig, where: str) -> None:
    if loss.distill_weight is not None and not loss.distill_weight >= 0:
        raise ConfigError(f"{where}: 'loss.distill_weight' must be >= 0 (or null: on when rows carry teacher scores)")
    if not loss.distill_temperature > 0:
        raise ConfigError(f"{where}: 'loss.distill_temperature' must be > 0, got {loss.distill_temperature}")
    dims, weights = loss.matryoshka_dims, loss.matryoshka_weights
    if dims is not None and (not isinstance(dims, list) or not dims or not all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in dims)):
        raise ConfigError(f"{where}: 'loss.matryoshka_dims' must be a non-empty list of positive whole numbers, "
                          f"got {dims!r}")
    if weights is not None:
        if dims is None:
            raise ConfigError(f"{where}: 'loss.matryoshka_weights' needs 'loss.matryoshka_dims'")
        if not isinstance(weights, list) or len(weights) != len(dims) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in weights):
            raise ConfigError(f"{where}: 'loss.matryoshka_weights' must be {len(dims)} numbers >= 0 (one per "
                              f"dimension), got {weights!r}")


_SCALARS = (bool, int, float, str, type(None))
# TrainingArguments does not check these itself; a bad value would only fail inside trainer.train()
_TRAINING_MINIMUM = {"learning_rate": (0.0, False), "per_device_train_batch_size": (1, True),
                     "per_device_eval_batch_size": (1, True), "gradient_accumulation_steps": (1, True),
                     "num_train_epochs": (0.0, False), "weight_decay": (0.0, True), "warmup_steps": (0.0, True),
                     "max_grad_norm": (0.0, True), "logging_steps": (0.0, False)}


def _check_training_values(t: dict, where: str) -> None:
    """Types of the `training` values against TrainingArguments' scalar field types, and the ranges above."""
    import dataclasses
    import types
    import typing

    from transformers import TrainingArguments

    hints = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
    for key, value in t.items():
        hint = hints.get(key)
        if hint is None:
            continue
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
            else (hint,)
        if not all(a in _SCALARS for a in allowed):
            continue  # enums, lists, dicts: TrainingArguments checks or converts them
        kinds = [{bool: "bool", int: "int", float: "float", str: "str", type(None): "None"}[a] for a in allowed]
        if not any(_ANNOTATION_CHECKS[k](value) for k in kinds):
            names = " or ".join({bool: "true/false", int: "a whole number", float: "a number", str: "a string",
                                 type(None): "null"}[a] for a in allowed)
            raise ConfigError(f"{where}: 'training.{key}' must be {names}, got {value!r}")
    for key, (low, inclusive) in _TRAINING_MINIMUM.items():
        value = t.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (value < low or (value == low and not inclusive)):
            if key == "num_train_epochs" and (t.get("max_steps") or 0) > 0:
                continue
            raise ConfigError(f"{where}: 'training.{key}' must be {'>=' if inclusive else '>'} {low}, got {value!r}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value``; the value is JSON when it parses (numbers, true/false, null, lists), else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"bad override {text!r}: expected section.key=value, e.g. training.learning_rate=2e-5")
    path, value = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return section.strip(), key.strip(), parsed


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is fine, as in data files
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    for item in overrides or []:
        section, key, value = parse_override(item)
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"override {item!r}: section '{section}' is not an object")
        raw.setdefault(section, {})[key] = value
    cfg = config_from_dict(raw, where=str(path))
    # Relative data paths are relative to the working directory, like every other CLI path.
    return cfg
