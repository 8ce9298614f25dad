"""Training configuration: one JSON file with sections, plus ``section.key=value`` overrides.

Sections: ``model``, ``data``, ``mining`` (optional: mine raw data on the fly), ``lora``, ``loss``,
``export`` (``merged_dtype``, ``base_merge_alpha``) and
``training`` (the fields of ``hfemb.training.arguments.EmbeddingTrainingArguments``: ``TrainingArguments`` plus
hfemb's own). Every section is checked against its dataclass's field annotations (``hfemb.config_fields``:
unknown keys stop with an error listing the valid ones, a wrong type names the field and the expected type)
and built with ``HfArgumentParser.parse_dict(..., allow_extra_keys=False)``; a new field needs no checking
code. The ``training`` values are kept as a dict (hfemb's defaults under the user's values) and become
``EmbeddingTrainingArguments`` when the run starts: ``TrainingArguments`` probes the hardware when built (bf16
on a CPU-only machine is an error there), and under DeepSpeed ZeRO-3 it must exist before the model loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import HfArgumentParser

from hfemb.config_fields import check_keys, check_section
from hfemb.errors import ConfigError
from hfemb.mining.mine import MiningConfig
from hfemb.modeling.dtypes import check_dtype
from hfemb.publishing.hub import push_settings
from hfemb.training.arguments import EmbeddingTrainingArguments
from hfemb.training.averaging import check_averaging_config

QWEN3_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FinetuneType = Literal["lora", "qlora", "full"]
FINETUNE_TYPES = typing.get_args(FinetuneType)
BatchSampler = Literal["no_duplicate_queries", "random"]
MergedDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen3-Embedding-0.6B"
    finetune_type: FinetuneType = "lora"
    pooling: str | None = None  # None: from the model's sentence-transformers config, else last/mean by architecture
    query_instruction: str | None = None  # None: the model's own prompt; "": no instruction; else the task text
    symmetric: bool = False  # instruction on documents too (pair classification, STS)
    torch_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: see hfemb.training.run_setup.resolve_dtype)
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False
    append_eos: bool | None = None  # None: append the end-of-text token only if the tokenizer does not
    truncate_dim: int | None = None  # Matryoshka: truncate, then normalise
    quantization_bits: int = 4  # qlora only: 4 or 8 (bitsandbytes, needs a CUDA GPU)
    # auto | true | false (null = auto): packed batches without padding (hfemb.modeling.packing); auto = on for
    # rotary decoders (Qwen3, Qwen2, Llama, Mistral) with sdpa/eager/flash attention, off for encoders
    padding_free: Literal["auto", True, False] | None = None


# data.pool_negatives unset (auto), decided on dev (README, Results): 15 for uniform draws (most WikiQA pools whole),
# 7 for rows drawn by SimANS (FlagEmbedding's train_group_size 8; 15 did not beat it there on dev, seed 42)
POOL_NEGATIVES_AUTO = 15
POOL_NEGATIVES_AUTO_SIMANS = 7


@dataclass
class DataConfig:
    train_file: str = ""
    # Several datasets in one run (instead of train_file): [{file, name?, instruction?, format?, weight?}]
    # (`TrainFileSpec`); every micro-batch holds rows of one dataset (hfemb.training.sampling.SameDatasetSampler)
    train_files: list[Any] | None = None  # entries checked by check_train_files (errors name data.train_files[i])
    eval_file: str | None = None
    eval_ratio: float | None = 0.0  # held-out share of training queries when there is no eval_file; null = 0
    format: str = "auto"
    query_columns: list[str] | None = None  # QA tables: columns joined into the query
    positive_column: str | None = None
    label_threshold: int = 1  # labelled pools: label >= threshold is relevant
    skip_bad_rows: bool = False
    query_max_len: int = 128
    passage_max_len: int = 512
    num_negatives: int = 3
    mine: bool | None = None  # None: mine when rows lack num_negatives negatives; needs no `mining` section
    # every epoch after the first (SimANS: every epoch) draws each row's negatives afresh from its mined pools
    # or, for a longer negative list, from all of it (hfemb.training.redraw); false: the same negatives each epoch
    redraw_negatives: bool = True
    # how epochs draw: uniform (from epoch 1) | simans (from epoch 0; rows with teacher scores: candidates the teacher
    # scores near the positive are drawn more often, weight exp(-((s_neg - s_pos) / redraw_simans_width)^2);
    # hfemb.training.redraw)
    # | auto: simans when the rows carry teacher scores (hfemb mine --teacher), else uniform (README, Results)
    redraw_sampling: Literal["auto", "uniform", "simans"] = "auto"
    redraw_simans_width: float = 0.025
    # negatives per row drawn from all of its record's candidates (mined hard and easy pools and negatives together,
    # repeated when short, as FlagEmbedding's train_group_size), redrawn as above; 0: num_negatives, as mined.
    # null (auto): POOL_NEGATIVES_AUTO (15; 7 for rows drawn by SimANS; num_negatives if more) when the file's pools
    # offer more than num_negatives, redraw_negatives is on and num_negatives is not 0, else 0
    # (hfemb.training.data_rows.pool_negatives_setting; decided on dev: README, Results)
    pool_negatives: int | None = None
    # no_duplicate_queries: no two rows of one query in a step's batch, across processes too
    # (hfemb.training.sampling); random: the Trainer's shuffling. training.group_by_length takes precedence.
    batch_sampler: BatchSampler = "no_duplicate_queries"
    # More eval sets by name, e.g. {"general": "beir/scifact"} to watch forgetting: retrieval / F1 metrics
    # logged as eval_<name>_<metric> (hfemb.training.evaluator); no loss on them.
    eval_files: dict[str, str] | None = None
    embedding_eval: bool = True  # retrieval / F1 metrics of the eval set at each evaluation (false: loss only)
    # top-k search of retrieval eval sets: exact blocked search, or FAISS (optional package; hfemb.evaluation.faiss_search)
    eval_search: Literal["exact", "faiss", "faiss-hnsw"] = "exact"


@dataclass
class TrainFileSpec:
    """One entry of ``data.train_files``."""

    file: str = ""
    name: str | None = None  # default: the file's stem; the prompt name in the exported model
    # None: the model's default query prompt; "" or false: no prompt; else the task of Qwen3's
    # "Instruct: {task}\nQuery:" (hfemb.modeling.loading.format_instruction)
    instruction: str | Literal[False] | None = None
    format: str | None = None  # None: data.format
    weight: float = 1.0  # batches per epoch = max(1, round(weight * rows / rows per step)); see sampling.py


RESERVED_PROMPT_NAMES = ("query", "document", "passage")  # sentence-transformers' own prompt names


def check_train_files(d: DataConfig, where: str) -> None:
    """``data.train_files`` checked entry by entry (errors name ``data.train_files[i].key``) and normalised in
    place: every key present, ``name`` defaulted to the file's stem; names unique."""
    if not isinstance(d.train_files, list) or not d.train_files:
        raise ConfigError(f"{where}: 'data.train_files' must be a non-empty list of objects "
                          "{file, name, instruction, format, weight}")
    entries, names = [], {}
    for i, raw in enumerate(d.train_files):
        section = f"data.train_files[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: '{section}' must be an object {{file, name, instruction, format, weight}}, "
                              f"got {raw!r}")
        spec = TrainFileSpec(**check_section(TrainFileSpec, section, raw, where))
        if not spec.file:
            raise ConfigError(f"{where}: '{section}.file' is required (the data file of this dataset)")
        if not (spec.weight > 0 and math.isfinite(spec.weight)):
            raise ConfigError(f"{where}: '{section}.weight' must be a finite number > 0, got {spec.weight!r}")
        if spec.name is None:
            base = Path(spec.file).name
            for compression in (".gz", ".bz2", ".xz", ".zst"):
                base = base.removesuffix(compression)
            spec.name = Path(base).stem
        if not spec.name or not all(c.isalnum() or c in "-_." for c in spec.name):
            raise ConfigError(f"{where}: '{section}.name' {spec.name!r}: use letters, digits, '-', '_' and '.' "
                              "(it names the dataset's prompt in the exported model)")
        if spec.name in RESERVED_PROMPT_NAMES:
            raise ConfigError(f"{where}: '{section}.name' must not be {spec.name!r} (a sentence-transformers prompt "
                              "name of its own); give the dataset another name")
        if spec.name in names:
            raise ConfigError(f"{where}: '{section}.name' {spec.name!r} is also the name of "
                              f"'data.train_files[{names[spec.name]}]'; give each dataset a distinct 'name'")
        names[spec.name] = i
        entries.append(dataclasses.asdict(spec))
    d.train_files = entries


def train_file_specs(d: DataConfig) -> list[TrainFileSpec]:
    """The datasets of a run: ``data.train_files`` (as checked by `check_train_files`), or ``data.train_file`` as
    one unnamed dataset with the model's own prompt."""
    if d.train_files:
        return [TrainFileSpec(**entry) for entry in d.train_files]
    return [TrainFileSpec(file=d.train_file, name=None, format=d.format)]


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str | None = None  # None: Qwen's q,k,v,o,gate,up,down if present, else all-linear
    bias: str = "none"


@dataclass
class LossConfig:
    # None (auto): resolved_temperature, by how the rows' negatives were found: CORPUS_TEMPERATURE when every
    # training file was mined in corpus mode, else POOL_TEMPERATURE.
    temperature: float | None = None
    in_batch_negatives: bool = True
    mask_duplicates: bool = True  # a candidate with the positive's exact text is never a negative
    mask_false_negatives: bool = False  # also drop candidates scoring above the positive + margin
    false_negative_margin: float = 0.1
    query_negatives: bool = False  # other in-batch queries as negatives (improved contrastive loss)
    document_negatives: bool = False  # positive vs the other in-batch documents (improved contrastive loss)
    # + doc_to_query_weight * the document -> query InfoNCE (each positive against the batch's queries, every
    # process's with cross-device negatives, at every Matryoshka dimension; hfemb.training.loss.
    # document_to_query_loss): sentence-transformers' symmetric MNRL is (InfoNCE + this at 1.0) / 2, the same
    # gradient direction. With mask_duplicates, queries of the same text or whose positive has the same text are
    # no negatives (a record's other listed positives and the margin rule are not applied here). 0: off.
    doc_to_query_weight: float = 0.0
    # Multi-process training (DDP, DeepSpeed): score each query against the documents of every process
    # (gathered with gradients, hfemb.training.distributed); no effect in one process or without in-batch negatives.
    cross_device_negatives: bool = True
    # Distillation (hfemb.training.distill): + distill_weight * KL(teacher || student) over each row's own
    # candidates, softmax at distill_temperature. None: when the rows carry teacher scores (`hfemb mine --teacher`,
    # FlagEmbedding's pos_scores/neg_scores), CORPUS_DISTILL_WEIGHT for corpus-mined rows and DEFAULT_DISTILL_WEIGHT
    # (0, off: not better on dev) for others; off without teacher scores.
    distill_weight: float | None = None
    distill_temperature: float = 0.05
    # kl: KL over each row's candidates (relative scores only); mse: mean squared difference of the cosine
    # similarities themselves (the teacher's absolute scale too, so its threshold behaviour across queries)
    distill_loss: Literal["kl", "mse"] = "kl"
    # Pair ranking across queries (hfemb.training.distill.pair_rank_loss, CoSENT): + pair_rank_weight * the
    # log-sum-exp of scale * (s(q_j, negative) - s(q_i, positive)) over every pair of the batch, so that one
    # cosine threshold separates relevant from irrelevant pairs. None: DEFAULT_PAIR_RANK_WEIGHT.
    pair_rank_weight: float | None = None
    pair_rank_scale: float = 20.0
    # Matryoshka: InfoNCE on each truncated, re-normalised prefix, summed with these weights (default 1 each);
    # list the full dimension too to keep training it (sentence-transformers' MatryoshkaLoss).
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None


# Off on labelled pools: on WikiQA dev, distilling all-mpnet-base-v2 into MiniLM did not beat the defaults (hybrid
# mpnet rows: dev best F1 / ROC-AUC 0.555 / 0.850 without, 0.532 / 0.847 with KL, 0.543 / 0.847 with MSE; README,
# Results): the teacher ranks worse than the student tuned on the labelled pools.
DEFAULT_DISTILL_WEIGHT = 0.0
# On corpus-mined rows (unlabelled negatives) with teacher scores: 3.0. On WikiQA's pairs-only dev runs the tuned
# student stays below the teacher (mpnet); KL at 1.0 beat none on both seeds, by a rule fixed before the second
# (two-seed means: ROC-AUC +0.015, best F1 +0.047, MRR@10 +0.014), and 3.0 beat 1.0 by the same rule, fixed before
# any run at 3.0, by a small margin (ROC-AUC +0.002, best F1 +0.001, MRR@10 +0.002; README, Results).
CORPUS_DISTILL_WEIGHT = 3.0


# Off: CoSENT at weight 1.0 cost 0.016 dev ROC-AUC on WikiQA (0.836 vs 0.852; README, Results).
DEFAULT_PAIR_RANK_WEIGHT = 0.0


# Labelled pools (pool-mode mining, or rows with their own negatives): 0.1, not sentence-transformers' 0.05 (scale
# 20): on WikiQA dev 0.1 lifted the two-seed means of ROC-AUC, best F1 and MRR@10 over 0.05 for both pool row types
# (10 of 12 per-seed comparisons); 0.02 and 0.2 lost; 0.05 lost again at 15 per row (README, Results).
POOL_TEMPERATURE = 0.1
# Corpus mining (`hfemb mine` from (query, positive) pairs: negatives are other queries' answers, half of them
# BM25's easy bottom): 0.05. On WikiQA's pairs-only dev runs 0.05 beat 0.1 on ROC-AUC and MRR@10 on both seeds
# (best F1 -0.002 on the mean), by a rule fixed before the second seed (README, Results).
CORPUS_TEMPERATURE = 0.05


def corpus_mined(mined_modes: list[str | None]) -> bool:
    """Every training file's rows were mined in corpus mode (``mined_modes``: ``"corpus"``, ``"pool"``, or None for
    rows not mined by hfemb, one per file)."""
    return bool(mined_modes) and all(m == "corpus" for m in mined_modes)


def resolved_temperature(loss: LossConfig, mined_modes: list[str | None]) -> float:
    """The InfoNCE temperature in effect: the configured one, else CORPUS_TEMPERATURE for corpus-mined rows
    (`corpus_mined`) and POOL_TEMPERATURE for any other."""
    if loss.temperature is not None:
        return float(loss.temperature)
    return CORPUS_TEMPERATURE if corpus_mined(mined_modes) else POOL_TEMPERATURE


def resolved_pair_rank_weight(loss: LossConfig) -> float:
    """The pair-ranking (CoSENT) weight in effect: the configured one, else the default."""
    return DEFAULT_PAIR_RANK_WEIGHT if loss.pair_rank_weight is None else float(loss.pair_rank_weight)


def resolved_distill_weight(loss: LossConfig, rows_have_teacher_scores: bool, corpus: bool = False) -> float:
    """The distillation weight in effect: the configured one, else, when rows carry teacher scores,
    CORPUS_DISTILL_WEIGHT for corpus-mined rows (``corpus``, `corpus_mined`) and DEFAULT_DISTILL_WEIGHT for others."""
    if loss.distill_weight is not None:
        return float(loss.distill_weight)
    if not rows_have_teacher_scores:
        return 0.0
    return CORPUS_DISTILL_WEIGHT if corpus else DEFAULT_DISTILL_WEIGHT


# Corpus-mined rows: 0.3 (70 % base). On WikiQA's pairs-only dev runs the tuned MiniLM fell below its base, and
# merging at 0.3 (chosen from 0.3 / 0.5 / 0.7 on seeds 42 and 7, rule fixed before seed 1) lifted ROC-AUC, best F1
# and MRR@10 on every seed and both row kinds (seed 1: default rows 0.787 / 0.445 / 0.688 -> 0.799 / 0.477 / 0.718;
# hybrid + teacher rows 0.792 / 0.472 / 0.704 -> 0.798 / 0.493 / 0.713). Labelled pools keep the trained weights
# (merging a 3-epoch full fine-tune at 0.5 / 0.7 / 0.85 cost dev AUC there; README, Results).
CORPUS_BASE_MERGE_ALPHA = 0.3


def resolved_base_merge_alpha(export: "ExportConfig", mined_modes: list[str | None]) -> float | list[float]:
    """The weight of the trained model when merged/ is interpolated with the base: the configured one (a list: the
    candidates the run's eval set chooses from), else CORPUS_BASE_MERGE_ALPHA for corpus-mined rows
    (`corpus_mined`) and 1 (no interpolation) for any other."""
    if export.base_merge_alphas:
        return [float(a) for a in export.base_merge_alphas]
    if export.base_merge_alpha is not None:
        return float(export.base_merge_alpha)
    return CORPUS_BASE_MERGE_ALPHA if corpus_mined(mined_modes) else 1.0


@dataclass
class ExportConfig:
    # dtype of merged/ (the merge runs in fp32 on the CPU, hfemb.training.merging): auto = the base's dtype when
    # the LoRA delta survives it (<= 1 % lost), else float32 | float32 | bfloat16 | float16
    merged_dtype: MergedDtype = "auto"
    # After training, merged/ = (1 - a) * base + a * trained, per tensor in fp32 (LM-Cocktail; `hfemb merge-weights`
    # with the run's base, hfemb.training.base_merge.merge_with_base): 1 = the trained weights as they are (adapter/
    # stays the trained adapter either way). None: auto, CORPUS_BASE_MERGE_ALPHA when every training file was
    # corpus-mined, 1 for any other rows.
    base_merge_alpha: float | None = None
    # Instead of base_merge_alpha, alphas to choose from, e.g. [0.3, 0.5, 0.7, 1]: each is scored on the run's eval
    # set (data.eval_file, eval_ratio or eval_files) by training.metric_for_best_model and the best kept
    # (hfemb.training.base_merge; `hfemb merge-weights --choose-on` does the same after a run).
    base_merge_alphas: list[float] | None = None


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
# Keys hfemb accepts in `training` although this transformers version spells them differently (translated by
# hfemb.training.run_setup.training_arguments), with their types.
TRAINING_ALIASES: dict[str, Any] = {"warmup_ratio": float, "gradient_checkpointing_kwargs": dict | None,
                                    "group_by_length": bool}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mining: dict[str, Any] | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    training: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the JSON file it came from

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings, "loss": LossConfig,
                 "export": ExportConfig}


def parse_section(cls, section: str, given, where: str):
    """``cls`` (a config dataclass) from one section of the config, checked by ``hfemb.config_fields``."""
    values = check_section(cls, section, given, where)
    (parsed,) = HfArgumentParser(cls).parse_dict(values, allow_extra_keys=False)
    return parsed


def config_from_dict(raw: dict[str, Any], where: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a JSON object with sections {sorted(SECTION_TYPES) + ['mining', 'training']}")
    check_keys("<top level>", raw, set(SECTION_TYPES) | {"mining", "training"}, where)
    cfg = TrainConfig(source=where)
    for name, cls in SECTION_TYPES.items():
        setattr(cfg, name, parse_section(cls, name, raw.get(name) or {}, where))
    if raw.get("mining") is not None:  # kept as given: the runner adds num_negatives and the mode
        cfg.mining = check_section(MiningConfig, "mining", raw["mining"], where)
    training = check_section(EmbeddingTrainingArguments, "training", raw.get("training", {}), where,
                             extra=TRAINING_ALIASES)
    cfg.training = {**TRAINING_DEFAULTS, **training}
    k = training.get("average_checkpoints")
    if isinstance(k, int) and k > 0 and "save_total_limit" not in training:  # hfemb's default must not block it
        cfg.training["save_total_limit"] = max(TRAINING_DEFAULTS["save_total_limit"], k)
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "config") -> None:
    m, d, t = cfg.model, cfg.data, cfg.training
    if not m.name_or_path:
        raise ConfigError(f"{where}: 'model.name_or_path' is required (a Hub id or a local folder)")
    if m.pooling not in (None, "last", "mean", "cls"):
        raise ConfigError(f"{where}: 'model.pooling' must be last, mean or cls, got {m.pooling!r}")
    if m.quantization_bits not in (4, 8):
        raise ConfigError(f"{where}: 'model.quantization_bits' must be 4 or 8, got {m.quantization_bits!r}")
    check_dtype(m.torch_dtype, f"{where}: 'model.torch_dtype'")
    if d.train_file and d.train_files is not None:
        raise ConfigError(f"{where}: give 'data.train_file' or 'data.train_files', not both")
    if d.train_files is not None:
        check_train_files(d, where)
        if t.get("group_by_length") or t.get("train_sampling_strategy") == "group_by_length":
            raise ConfigError(f"{where}: 'training.group_by_length' does not work with 'data.train_files' (each "
                              "batch is drawn from one dataset); remove one of them")
        if m.symmetric and len({repr(s.instruction) for s in train_file_specs(d)}) > 1:
            # the saved model and the in-training evaluator give documents the model's one document prompt
            raise ConfigError(f"{where}: 'model.symmetric' with 'data.train_files' of different instructions is not "
                              "supported (documents would be trained with one prompt per dataset but evaluated and "
                              "served with one); train each symmetric task on its own, or give them one instruction")
    elif not d.train_file:
        raise ConfigError(f"{where}: 'data.train_file' is required (or 'data.train_files', a list of datasets)")
    if d.eval_ratio is None:
        d.eval_ratio = 0.0  # null: no held-out share
    if not 0.0 <= d.eval_ratio < 1.0:
        raise ConfigError(f"{where}: 'data.eval_ratio' must be a number in [0, 1), got {d.eval_ratio!r}")
    if d.eval_file and d.eval_ratio:
        raise ConfigError(f"{where}: give 'data.eval_file' or 'data.eval_ratio', not both "
                          "(on the command line: data.eval_file=FILE data.eval_ratio=0)")
    if d.eval_files is not None:
        if not isinstance(d.eval_files, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                         for k, v in d.eval_files.items()):
            raise ConfigError(f"{where}: 'data.eval_files' must be an object {{name: path}}, got {d.eval_files!r}")
        bad = [k for k in d.eval_files if not k or not all(c.isalnum() or c in "-_" for c in k)]
        if bad:
            raise ConfigError(f"{where}: 'data.eval_files' name {bad[0]!r}: use letters, digits, - and _ "
                              "(metrics are logged as eval_<name>_<metric>)")
    if d.redraw_sampling not in ("auto", "uniform", "simans"):
        raise ConfigError(f"{where}: 'data.redraw_sampling' must be auto, uniform or simans, got {d.redraw_sampling!r}")
    if isinstance(d.redraw_simans_width, bool) or not (isinstance(d.redraw_simans_width, (int, float))
                                                        and d.redraw_simans_width > 0):
        raise ConfigError(f"{where}: 'data.redraw_simans_width' must be a number > 0, got {d.redraw_simans_width!r}")
    for key in ("query_max_len", "passage_max_len"):
        if getattr(d, key) < 4:
            raise ConfigError(f"{where}: 'data.{key}' must be at least 4, got {getattr(d, key)}")
    if d.num_negatives < 0:
        raise ConfigError(f"{where}: 'data.num_negatives' must be >= 0")
    if d.pool_negatives is not None and (isinstance(d.pool_negatives, bool) or not isinstance(d.pool_negatives, int)
                                         or d.pool_negatives < 0):
        raise ConfigError(f"{where}: 'data.pool_negatives' must be an integer >= 0 or null (auto), "
                          f"got {d.pool_negatives!r}")
    if (d.query_columns is None) != (d.positive_column is None):
        raise ConfigError(f"{where}: give both 'data.query_columns' and 'data.positive_column', or neither")
    if (cfg.loss.query_negatives or cfg.loss.document_negatives) and not cfg.loss.in_batch_negatives:
        raise ConfigError(f"{where}: 'loss.query_negatives' / 'loss.document_negatives' need 'loss.in_batch_negatives'")
    if cfg.loss.temperature is not None and not 0 < cfg.loss.temperature < math.inf:
        raise ConfigError(f"{where}: 'loss.temperature' must be > 0 and finite (or null: auto), "
                          f"got {cfg.loss.temperature}")
    if not cfg.loss.doc_to_query_weight >= 0 or not math.isfinite(cfg.loss.doc_to_query_weight):
        raise ConfigError(f"{where}: 'loss.doc_to_query_weight' must be >= 0, got {cfg.loss.doc_to_query_weight}")
    if cfg.loss.doc_to_query_weight and not cfg.loss.in_batch_negatives:
        raise ConfigError(f"{where}: 'loss.doc_to_query_weight' needs 'loss.in_batch_negatives' (the batch's queries)")
    _check_distill_matryoshka(cfg.loss, where)
    alpha, alphas = cfg.export.base_merge_alpha, cfg.export.base_merge_alphas
    if alpha is not None and not 0 < alpha <= 1:  # (its type is checked with the section's)
        raise ConfigError(f"{where}: 'export.base_merge_alpha' must be in (0, 1] (1: the trained weights; null: auto), "
                          f"got {alpha!r}")
    if alphas is not None and (not alphas or not all(0 < a <= 1 for a in alphas)):
        raise ConfigError(f"{where}: 'export.base_merge_alphas' must be a non-empty list of numbers in (0, 1] (the "
                          f"alphas the eval set chooses from), got {alphas!r}")
    if alphas is not None and alpha is not None:
        raise ConfigError(f"{where}: set 'export.base_merge_alpha' (one alpha) or 'export.base_merge_alphas' (chosen on "
                          "the eval set), not both")
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
    _check_training_ranges(t, where)
    try:
        push_settings(t)  # refuses hub_token in files, needs hub_model_id with push_to_hub
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    mini_batch = t.get("grad_cache_mini_batch")
    if mini_batch is not None and mini_batch < 0:
        raise ConfigError(f"{where}: 'training.grad_cache_mini_batch' must be a whole number of rows >= 1 "
                          f"(or 0/null for off), got {mini_batch!r}")
    check_averaging_config(t, where)
    if m.finetune_type == "qlora" and deepspeed_zero_stage(t.get("deepspeed"), where) == 3:
        raise ConfigError(f"{where}: QLoRA (finetune_type 'qlora') with DeepSpeed ZeRO-3 is not supported: ZeRO-3 "
                          "shards weights of one storage dtype and bitsandbytes 4-bit weights are uint8 unless "
                          "bnb_4bit_quant_storage is set, which hfemb does not do; use configs/deepspeed/zero2.json, "
                          "or LoRA (finetune_type 'lora') with ZeRO-3")
    if mini_batch and t.get("deepspeed"):
        raise ConfigError(f"{where}: 'training.grad_cache_mini_batch' does not work with DeepSpeed (accelerate steps "
                          "its engine after each backward call); use ZeRO without GradCache, or DDP with GradCache")


def deepspeed_zero_stage(value: Any, where: str = "config") -> int | None:
    """The ZeRO stage of ``training.deepspeed`` (a JSON file path or a dict), None when absent or unset."""
    if not value:
        return None
    if isinstance(value, (str, os.PathLike)):
        try:
            value = json.loads(Path(value).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: 'training.deepspeed': cannot read {value}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: 'training.deepspeed': {value}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    stage = (value.get("zero_optimization") or {}).get("stage") if isinstance(value, dict) else None
    return stage if isinstance(stage, int) else None


def _check_distill_matryoshka(loss: LossConfig, where: str) -> None:
    if loss.distill_weight is not None and not loss.distill_weight >= 0:
        raise ConfigError(f"{where}: 'loss.distill_weight' must be >= 0 (or null: the default, off)")
    if loss.pair_rank_weight is not None and not loss.pair_rank_weight >= 0:
        raise ConfigError(f"{where}: 'loss.pair_rank_weight' must be >= 0 (or null: the default)")
    if not loss.pair_rank_scale > 0:
        raise ConfigError(f"{where}: 'loss.pair_rank_scale' must be > 0, got {loss.pair_rank_scale}")
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


# TrainingArguments does not check these itself; a bad value would only fail inside trainer.train()
_TRAINING_MINIMUM = {"learning_rate": (0.0, False), "per_device_train_batch_size": (1, True),
                     "per_device_eval_batch_size": (1, True), "gradient_accumulation_steps": (1, True),
                     "num_train_epochs": (0.0, False), "weight_decay": (0.0, True), "warmup_steps": (0.0, True),
                     "max_grad_norm": (0.0, True), "logging_steps": (0.0, False)}


def _check_training_ranges(t: dict, where: str) -> None:
    """The ranges above (the types were checked against the annotations)."""
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


def blame_override(exc: ConfigError, where: str, applied: list[tuple[str, str, str]]) -> ConfigError:
    """``exc`` reworded to name the command-line override it is about (``applied``: (text, section, key) of
    each override), instead of the config file ``where``; ``exc`` itself when no override is named in it."""
    message = str(exc).removeprefix(f"{where}: ")
    for item, section, key in reversed(applied):
        if f"'{section}.{key}'" in message or (f"{key!r}" in message and f"'{section}'" in message):
            return ConfigError(f"override {item!r}: {message}")
    for item, section, key in reversed(applied):  # TrainingArguments' own messages name fields bare
        if section == "training" and re.search(rf"(?<![\w.])(?:training\.)?{re.escape(key)}(?!\w)", message):
            return ConfigError(f"override {item!r}: {message}")
    return exc


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
    if overrides and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a JSON object with sections "
                          f"{sorted(SECTION_TYPES) + ['mining', 'training']}, not a {type(raw).__name__}")
    applied = []
    for item in overrides or []:
        section, key, value = parse_override(item)
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"override {item!r}: section '{section}' is not an object")
        raw.setdefault(section, {})[key] = value
        applied.append((item, section, key))
    try:
        cfg = config_from_dict(raw, where=str(path))
    except ConfigError as exc:
        raise blame_override(exc, str(path), applied) from None
    # Relative data paths are relative to the working directory, like every other CLI path.
    return cfg
