"""Model card (``README.md``) for a trained model folder, with Hub metadata in its YAML header.

The card is built from what the training run wrote (``train_summary.json``, ``train_log.jsonl``, the mining
report, ``training_curves.png``) and, when one is found, the ``results.json`` of ``run_eval.py``. The
recommended threshold (the one ``run_eval.py`` chose for this model) goes into the card, its
``model-index`` metrics, and ``hfemb_threshold.json`` in the model folder. It is *not* written into
``config_sentence_transformers.json``: sentence-transformers ignores unknown keys there on load and drops
them on every re-save, so the value would silently vanish.

Nothing that could hold a token goes into a card: config keys mentioning ``token`` (and the ``hub_*`` push
settings) are left out, and only file names (not full local paths) are shown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfemb.errors import HfembError
from hfemb.evaluation.encoders import resolve_model_path
from hfemb.evaluation.report import summary_table
from hfemb.io_utils import atomic_open, write_json
from hfemb.mining.mine import report_path
from hfemb.modeling.merge_weights import AVERAGING_FILE, PROVENANCE_FILE, read_merge_record
from hfemb.modeling.st_layout import st_pooling

log = logging.getLogger("hfemb.publishing.model_card")

THRESHOLD_FILE = "hfemb_threshold.json"
CURVES_FILE = "training_curves.png"
_PATH_KEYS = {"train_file", "eval_file", "output_dir", "logging_dir", "cache_dir"}
_LOWER_IS_BETTER = ("loss", "negative_similarity")
_LOG_SKIP = ("runtime", "per_second", "total_flos", "epoch", "step", "grad_norm", "learning_rate",
             "best_threshold")  # a threshold is a setting, not a quality: no "best" of it
_EXAMPLES = {
    "zh": (["高血压患者日常饮食需要注意什么？"],
           ["高血压患者应低盐饮食，每日食盐摄入不超过5克，多吃蔬菜水果，戒烟限酒。"]),
    "en": (["What should people with high blood pressure eat?"],
           ["People with hypertension should eat less salt and more vegetables and fruit, and limit alcohol."]),
}


@dataclass
class ModelCardResult:
    text: str  # README.md content
    threshold: dict | None  # hfemb_threshold.json content, when evaluation results were found
    eval_results_file: Path | None


# ---- inputs ------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HfembError(f"{path}: cannot read JSON: {exc}") from None


def is_hub_id(name: str | None) -> bool:
    """``owner/name`` that is not an existing local path (local bases are not valid ``base_model`` values)."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def base_card_metadata(base: str | None) -> dict:
    """``license`` and ``language`` of the base model's own card (local folder or Hub cache; never the network)."""
    if not base:
        return {}
    path = Path(base, "README.md") if os.path.isdir(base) else None
    if path is None and is_hub_id(base):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "README.md")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # a malformed base card must not stop ours
        log.warning("%s: cannot read the base model card (%s)", path, exc)
        return {}
    return {k: data[k] for k in ("license", "language") if data.get(k)}


def training_curve_summary(log_file: Path) -> list[dict]:
    """Per logged metric of ``train_log.jsonl``: first, last and best value with their steps (a repeated
    step keeps its last value). Best is the minimum for losses and negative similarity, else the maximum."""
    series: dict[str, dict[int, float]] = {}
    try:
        lines = Path(log_file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        if "train_runtime" in row:  # the end-of-training summary line
            continue
        for key, value in row.items():
            if any(s in key for s in _LOG_SKIP) or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isfinite(value):
                series.setdefault(key, {})[int(row.get("step", 0))] = float(value)
    out = []
    for key, points in series.items():
        steps = sorted(points)
        lower = any(s in key for s in _LOWER_IS_BETTER)
        best = (min if lower else max)(steps, key=lambda s: points[s])
        out.append({"metric": key, "first": (steps[0], points[steps[0]]), "last": (steps[-1], points[steps[-1]]),
                    "best": (best, points[best]), "lower_is_better": lower, "points": len(steps)})
    return sorted(out, key=lambda m: (m["metric"].startswith("eval_"), m["metric"]))


def _same_model(spec: str, identities: set[Path], bases: list[Path]) -> bool:
    for base in bases:
        path = Path(resolve_model_path(str(base / spec)))
        if path.exists() and path.resolve() in identities:
            return True
    return False


def find_eval_entry(results_file: Path, model_dir: Path, output_dir: Path | None,
                    model_name: str | None = None) -> tuple[dict, str] | None:
    """(results.json content, the name of this model in it), or None when it does not name this model.
    A model matches when its spec is this folder, its training output, or the run's merged/adapter."""
    report = _read_json(results_file)
    if not isinstance(report, dict) or not isinstance(report.get("models"), dict):
        raise HfembError(f"{results_file}: not a results.json written by run_eval.py (no 'models')")
    if model_name is not None:
        if model_name not in report["models"]:
            raise HfembError(f"{results_file}: no model named {model_name!r} (it has {', '.join(report['models'])})")
        return report, model_name
    identities = {model_dir.resolve()}
    if output_dir is not None:
        identities |= {(output_dir / sub).resolve() for sub in ("merged", "adapter")}
    bases = [Path.cwd(), results_file.resolve().parent.parent, results_file.resolve().parent]
    for name, entry in report["models"].items():
        if isinstance(entry, dict) and _same_model(str(entry.get("model", "")), identities, bases):
            return report, name
    return None


def discover_eval_results(model_dir: Path, output_dir: Path | None, model_name: str | None = None
                          ) -> tuple[Path, dict, str] | None:
    """The first results.json that names this model: ``OUTPUT/eval/``, ``OUTPUT/../eval/``, then the newest
    ``eval_output/results.json`` or ``eval_output/*/results.json`` under the working directory. Results older
    than the model's weights are skipped (they evaluated an earlier run saved to the same folder).
    With ``model_name``, the first of them that has a model of that name (an error if none has)."""
    candidates = [output_dir / "eval" / "results.json", output_dir.parent / "eval" / "results.json"] \
        if output_dir is not None else []
    found = [p for p in (Path("eval_output/results.json"), *Path("eval_output").glob("*/results.json")) if p.is_file()]
    candidates += sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    weights = [p.stat().st_mtime for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin")]
    for path in candidates:
        if not path.is_file():
            continue
        if weights and path.stat().st_mtime < max(weights):  # evaluated earlier weights saved at this path
            log.info("skipping %s: older than the weights in %s", path, model_dir)
            continue
        try:
            hit = find_eval_entry(path, model_dir, output_dir, model_name)
        except HfembError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if hit:
            return path, hit[0], hit[1]
    if model_name is not None:
        looked = ", ".join(str(p) for p in candidates) or "no results.json found"
        raise HfembError(f"--eval-model {model_name!r}: no results.json names it (looked at: {looked}); "
                         "pass the file with --eval-results FILE")
    return None


# ---- sections ------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "–" if value is None else str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]


def clean_config(config: dict) -> dict:
    """The training config without anything push- or token-related, and local file paths cut to their names."""
    def keep(key: str) -> bool:
        return "token" not in key.lower() and not key.startswith("hub_") and key != "push_to_hub"

    def value(key: str, v: Any) -> Any:
        if key == "train_files" and isinstance(v, list):  # data.train_files: [{file, name, ...}]
            return [{**e, "file": value("train_file", e.get("file"))} if isinstance(e, dict) else e for e in v]
        return Path(v).name if key in _PATH_KEYS and isinstance(v, str) and v else v

    return {section: ({k: value(k, v) for k, v in body.items() if keep(k)} if isinstance(body, dict) else body)
            for section, body in config.items()}


def data_language(summary: dict) -> str | None:
    """"zh" when the training file (if still present) is mostly Chinese: Han characters, no kana, in its first 64 KB."""
    file = (((summary.get("config") or {}).get("data") or {}).get("train_file")) or ""
    try:
        with open(file, encoding="utf-8", errors="ignore") as fh:
            text = fh.read(65536)
    except OSError:
        return None
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    kana = sum("\u3040" <= ch <= "\u30ff" for ch in text)
    letters = sum(ch.isalpha() for ch in text)
    return "zh" if letters and han > 0.3 * letters and kana < 0.01 * han else None


def _hyperparameters(summary: dict) -> list[tuple[str, Any]]:
    cfg = summary.get("config", {})
    m, t, lora, loss, data = (cfg.get(k) or {} for k in ("model", "training", "lora", "loss", "data"))
    rows = [("learning rate", t.get("learning_rate")),
            ("epochs" if not t.get("max_steps", -1) > 0 else "max steps",
             t.get("num_train_epochs") if not t.get("max_steps", -1) > 0 else t["max_steps"]),
            ("batch size per device × gradient accumulation",
             f"{t.get('per_device_train_batch_size')} × {t.get('gradient_accumulation_steps', 1)}"),
            ("scheduler / warmup", f"{t.get('lr_scheduler_type', 'linear')} / "
                                   f"{t.get('warmup_ratio', t.get('warmup_steps', 0))}"),
            ("weight decay", t.get("weight_decay", 0.0)),
            ("precision", "bf16" if t.get("bf16") else "fp16" if t.get("fp16") else "fp32"),
            ("gradient checkpointing", bool(t.get("gradient_checkpointing") or t.get("activation_checkpointing"))),
            ("loss", f"InfoNCE, temperature {loss.get('temperature')}, "
                     f"{'in-batch + ' if loss.get('in_batch_negatives', True) else ''}{data.get('num_negatives')} "
                     f"hard/easy negatives per query"
                     + (", false negatives masked" if loss.get("mask_false_negatives") else "")),
            ("max length (query / passage)", f"{data.get('query_max_len')} / {data.get('passage_max_len')}"),
            ("seed", t.get("seed"))]
    redraw = (summary.get("data") or {}).get("redraw_negatives") or {}
    if redraw.get("rows") and float((summary.get("train") or {}).get("epoch") or 0) > 1:
        rows.insert(rows.index(next(r for r in rows if r[0] == "loss")) + 1,
                    ("negatives", f"redrawn every epoch after the first, from each row's mined pools or longer "
                                  f"negative list ({redraw['rows']:,} of {redraw['of']:,} rows)"
                                  + (", the ones the teacher scores near the positive more often (SimANS)"
                                     if redraw.get("sampling") == "simans" else "")))
    if m.get("finetune_type") in ("lora", "qlora"):
        targets = lora.get("target_modules") or "q,k,v,o,gate,up,down projections"
        rows.insert(0, ("LoRA", f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
                                f"targets {_fmt(targets)}"))
        if m.get("finetune_type") == "qlora":
            rows.insert(1, ("quantization", f"{m.get('quantization_bits', 4)}-bit base (bitsandbytes)"))
    params = summary.get("parameters") or {}
    if params.get("total"):
        rows.append(("trainable parameters", f"{params['trainable']:,} of {params['total']:,} "
                                             f"({100 * params['trainable'] / params['total']:.2f}%)"))
    rows += [("steps", summary.get("global_step")), ("training time", f"{summary.get('seconds')} s on "
                                                                     f"{summary.get('device')}")]
    versions = summary.get("versions") or {}
    if versions:
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return rows


def _data_section(summary: dict) -> list[str]:
    out = []
    for part, info in (summary.get("data") or {}).items():
        if not isinstance(info, dict):
            continue
        if info.get("from") == "eval_ratio":
            out.append(f"- **{part}**: {info.get('rows')} rows held out from the training queries "
                       f"(ratio {info.get('ratio')}, split by query)")
            continue
        text = (f"- **{part}**: `{Path(str(info.get('file', ''))).name}` ({info.get('format')}): "
                f"{info.get('records')} records → {info.get('rows')} {part} rows")
        extra = [f"{info[k]} {k.replace('_', ' ')}" for k in ("skipped_bad_rows", "dropped_short_of_negatives")
                 if info.get(k)]
        if info.get("rows_after_eval_split") is not None:
            extra.append(f"{info['rows_after_eval_split']} rows left after the eval split")
        out.append(text + (f" ({'; '.join(extra)})" if extra else ""))
    return out


def _mining_report(summary: dict) -> dict | None:
    train = (summary.get("data") or {}).get("train") or {}
    if isinstance(train.get("mining"), dict):
        return train["mining"]

    file = train.get("file")
    return _read_json(report_path(file)) if file and report_path(file).is_file() else None


def _mining_section(report: dict, where: str) -> list[str]:
    c = report.get("config") or {}
    negs = report.get("negatives") or {}
    dropped = report.get("rows_dropped") or {}
    rows = [("mode / tokenizer", f"{c.get('mode')} / {c.get('tokenizer')}"),
            ("BM25", f"k1 {c.get('k1')}, b {c.get('b')}, idf {c.get('idf')}"),
            ("hard negatives", f"{c.get('num_hard')} per query from BM25 ranks {c.get('skip_top', 0) + 1}–"
                               f"{(c.get('skip_top') or 0) + (c.get('hard_top_k') or 0)}"),
            ("easy negatives", f"the rest of {c.get('num_negatives')} from the {c.get('easy_bottom_k')} lowest-ranked"),
            ("max relative score", c.get("max_relative_score")),
            ("negatives written (hard / easy / random)",
             f"{negs.get('hard')} / {negs.get('easy')} / {negs.get('random')}"),
            ("queries / rows written / rows dropped", f"{report.get('queries')} / {report.get('rows_written')} / "
                                                      f"{sum(v for v in dropped.values() if isinstance(v, int))}")]
    return [f"Negatives were mined with BM25 ({where}):", "", *_table(rows)]


def _curves_section(curves: list[dict], has_png: bool) -> list[str]:
    out = ["| metric | first (step) | last (step) | best (step) |", "|---|---|---|---|"]
    for c in curves:
        arrow = "↓" if c["lower_is_better"] else "↑"
        cells = [f"{_fmt(c[k][1])} ({c[k][0]})" for k in ("first", "last", "best")]
        out.append(f"| {c['metric']} {arrow} | " + " | ".join(cells) + " |")
    if has_png:
        out += ["", f"![training curves]({CURVES_FILE})"]
    return out


def _eval_section(report: dict, name: str, results_file: Path) -> tuple[list[str], dict]:
    m = report["models"][name]
    data = (report.get("data") or {}).get("eval") or {}
    try:
        table = summary_table(report)
    except (KeyError, TypeError, IndexError) as exc:
        raise HfembError(f"{results_file}: not a complete results.json from run_eval.py (missing {exc})") from None
    threshold = {
        "threshold": m["chosen_threshold"], "similarity": "cosine",
        "rule": "relevant when cosine(query embedding with the query prompt, document embedding) >= threshold",
        "chosen_on": m.get("chosen_on"), "f1": m.get("f1_at_chosen"), "precision": m.get("precision_at_chosen"),
        "recall": m.get("recall_at_chosen"), "threshold_ci95": m.get("chosen_threshold_ci"),
        "eval_data": Path(str(data.get("path", ""))).name or None, "model_name_in_results": name,
    }
    on = "the dev set" if m.get("chosen_on") == "dev" else "the evaluation set itself (optimistic: no dev set)"
    out = [f"Threshold-sweep evaluation with `run_eval.py` on `{threshold['eval_data']}` ({data.get('pairs')} "
           f"query–document pairs, {data.get('positive_pairs')} relevant, {data.get('queries')} queries); a pair is "
           "predicted relevant when the cosine similarity is at least the threshold. This model is "
           f"**{name}**.", "", table, "",
           f"**Recommended threshold: {_fmt(m['chosen_threshold'])}** (best F1 on {on}; F1 "
           f"{_fmt(m.get('f1_at_chosen'))}, precision {_fmt(m.get('precision_at_chosen'))}, recall "
           f"{_fmt(m.get('recall_at_chosen'))} on the evaluation set). It is also saved in `{THRESHOLD_FILE}`."]
    return out, threshold


def _usage_section(model_id: str, prompts: dict, pooling: str, max_length: int, threshold: float | None,
                   language: str, adapter: bool) -> list[str]:
    queries, documents = _EXAMPLES[language]
    query_prompt = prompts.get("query", "")
    decide = f"\nrelevant = scores >= {threshold!r}  # the recommended threshold" if threshold is not None else ""
    st = (f"from sentence_transformers import SentenceTransformer\n\n"
          f"model = SentenceTransformer({model_id!r})\n"
          f"queries = {queries!r}\ndocuments = {documents!r}\n"
          "query_embeddings = model.encode(queries, prompt_name=\"query\")  # adds the query prompt\n"
          "document_embeddings = model.encode(documents)\n"
          "scores = model.similarity(query_embeddings, document_embeddings)  # cosine" + decide)
    side = "left" if pooling == "last" else "right"
    if pooling == "last":
        pool = ("    # last-token pooling: the last real token of each text (left padding puts it at the end)\n"
                "    mask = batch[\"attention_mask\"]\n"
                "    last = (torch.arange(mask.shape[1]) * mask).argmax(dim=1)\n"
                "    embeddings = hidden[torch.arange(hidden.shape[0]), last]\n")
    elif pooling == "cls":
        pool = "    embeddings = hidden[:, 0]  # CLS pooling (right padding)\n"
    else:
        pool = ("    mask = batch[\"attention_mask\"].unsqueeze(-1).to(hidden.dtype)\n"
                "    embeddings = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # mean pooling\n")
    loader = "AutoModel.from_pretrained(model_id)" + ("  # needs peft: loads the base, then this adapter"
                                                      if adapter else "")
    tf = (f"import torch\nimport torch.nn.functional as F\nfrom transformers import AutoModel, AutoTokenizer\n\n"
          f"model_id = {model_id!r}\n"
          f"tokenizer = AutoTokenizer.from_pretrained(model_id, padding_side={side!r})\n"
          f"model = {loader}.eval()\n"
          f"query_prompt = {query_prompt!r}\n"
          f"document_prompt = {prompts.get('document', '')!r}\n"
          f"queries = {queries!r}\ndocuments = {documents!r}\n\n\n"
          "def embed(texts):\n"
          f"    batch = tokenizer(texts, padding=True, truncation=True, max_length={max_length}, return_tensors=\"pt\")\n"
          "    with torch.no_grad():\n"
          "        hidden = model(**batch).last_hidden_state.float()  # [batch, tokens, hidden]\n"
          f"{pool}"
          "    return F.normalize(embeddings, p=2, dim=-1)\n\n\n"
          "query_embeddings = embed([query_prompt + q for q in queries])\n"
          "document_embeddings = embed([document_prompt + d for d in documents])\n"
          "scores = query_embeddings @ document_embeddings.T  # cosine similarity" + decide)
    notes = ["Queries get the query prompt; documents get "
             + ("the document prompt." if prompts.get("document") else "none.")
             + (" The tokenizer appends the end-of-text token itself; pooling takes the last token with left "
                "padding." if pooling == "last" else "")]
    return ["### sentence-transformers", "", "```python", st, "```", "", "### transformers", "", "```python", tf,
            "```", "", *notes, "", "The folder also serves as an OpenAI-compatible endpoint: `hfemb serve "
            f"{model_id}` (POST `/v1/embeddings`)."]


# ---- the card ------------------------------------------------------------------------------------
@dataclass
class _Model:
    """What the card says about the folder itself."""

    folder: Path
    output_dir: Path | None
    summary: dict
    adapter: bool
    base: str | None
    kind: str | None  # lora | qlora | full
    prompts: dict
    pooling: str
    max_length: int
    merge: dict | None  # hfemb_merge.json of `hfemb merge-weights`
    averaging: dict | None  # hfemb_averaging.json: these weights are a checkpoint average (training)


def _describe(model_dir: Path, output_dir, base_model: str | None, finetune_type: str | None) -> _Model:
    if output_dir is None and (model_dir.parent / "train_summary.json").is_file():
        output_dir = model_dir.parent
    output_dir = Path(output_dir) if output_dir is not None else None
    summary = (_read_json(output_dir / "train_summary.json") or {}) if output_dir else {}
    model_cfg = (summary.get("config") or {}).get("model") or {}
    adapter_cfg = _read_json(model_dir / "adapter_config.json")
    merge = read_merge_record(model_dir)
    return _Model(
        folder=model_dir, output_dir=output_dir, summary=summary, adapter=adapter_cfg is not None,
        base=base_model or model_cfg.get("name_or_path") or (adapter_cfg or {}).get("base_model_name_or_path")
        or (merge or {}).get("base"), merge=merge, averaging=read_merge_record(model_dir, AVERAGING_FILE),
        kind=finetune_type or model_cfg.get("finetune_type") or ("lora" if adapter_cfg is not None else None),
        prompts=(_read_json(model_dir / "config_sentence_transformers.json") or {}).get("prompts") or {},
        pooling=st_pooling(str(model_dir)) or "mean",
        max_length=(_read_json(model_dir / "sentence_bert_config.json") or {}).get("max_seq_length") or 512)


def _evaluation(m: _Model, eval_results, eval_model_name: str | None) -> tuple[Path, dict, str] | None:
    """(results.json, its content, this model's name there) or None."""
    if eval_results is False:
        return None
    if eval_results is None:
        return discover_eval_results(m.folder, m.output_dir, eval_model_name)
    if not Path(eval_results).is_file():
        raise HfembError(f"{eval_results}: no such file (--eval-results takes a results.json written by run_eval.py)")
    hit = find_eval_entry(Path(eval_results), m.folder, m.output_dir, eval_model_name)
    if hit is None:
        names = ", ".join(_read_json(Path(eval_results))["models"])
        raise HfembError(f"{eval_results}: none of its models ({names}) is {m.folder}; name the right one with "
                         "--eval-model NAME")
    return (Path(eval_results), *hit)


def _card_data(m: _Model, title: str, languages: list[str], license_: str | None, found, threshold):
    from huggingface_hub import EvalResult, ModelCardData

    eval_index = []
    if threshold is not None:
        scores = found[1]["models"][found[2]]
        for metric, key, label in (("f1", "f1_at_chosen", "F1 at the recommended threshold"),
                                   ("precision", "precision_at_chosen", "precision at the threshold"),
                                   ("recall", "recall_at_chosen", "recall at the threshold"),
                                   ("roc_auc", "roc_auc", "ROC-AUC"),
                                   ("average_precision", "average_precision", "average precision")):
            value = scores.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                eval_index.append(EvalResult(
                    task_type="sentence-similarity", dataset_type=threshold["eval_data"] or "custom",
                    dataset_name=threshold["eval_data"] or "custom", metric_type=metric, metric_value=float(value),
                    metric_name=label, metric_args=None if metric in ("roc_auc", "average_precision")
                    else {"threshold": threshold["threshold"], "similarity": "cosine"}))
    tags = ["sentence-transformers", "feature-extraction", "sentence-similarity", "hfemb"]
    tags += [t for t in (m.kind, "peft" if m.adapter else None) if t]
    return ModelCardData(library_name="sentence-transformers", pipeline_tag="sentence-similarity",
                         base_model=m.base if is_hub_id(m.base) else None, license=license_,
                         language=languages or None, tags=tags, model_name=title if eval_index else None,
                         eval_results=eval_index or None)


def _overview(m: _Model, title: str, threshold: dict | None, mined: bool) -> list[str]:
    kind = {"lora": "LoRA", "qlora": "QLoRA (4/8-bit base, LoRA adapters)", "full": "full fine-tuning"}.get(m.kind,
                                                                                                          m.kind)
    base = (f"[{m.base}](https://huggingface.co/{m.base})" if is_hub_id(m.base)
            else f"`{m.base}` (a local model folder)")
    what = ("a LoRA adapter (load it on its base model; `peft` required)" if m.adapter
            else "a full model (LoRA merged into the weights)" if m.kind in ("lora", "qlora") else "a full model")
    negatives = "BM25-mined hard negatives" if mined else "hard negatives"
    return [f"# {title}", "",
            f"A text-embedding model fine-tuned from {base} with hfemb ({kind or 'fine-tuned'}), contrastively on "
            f"query–document pairs with {negatives}. This folder holds {what} in the sentence-transformers layout.",
            "", "## Model", "", *_table([
                ("base model", m.base), ("fine-tuning", kind),
                ("pooling", {"last": "last token", "mean": "mean", "cls": "CLS"}[m.pooling]),
                ("normalisation", "L2 (use cosine or dot product)"), ("max sequence length", m.max_length),
                ("query prompt", f"`{json.dumps(m.prompts.get('query', ''), ensure_ascii=False)}`"),
                ("document prompt", f"`{json.dumps(m.prompts.get('document', ''), ensure_ascii=False)}`"),
                *[(f"prompt `{name}` (`prompt_name={name!r}`)", f"`{json.dumps(text, ensure_ascii=False)}`")
                  for name, text in m.prompts.items() if name not in ("query", "document", "passage")],
                ("recommended threshold", threshold["threshold"] if threshold else "not evaluated yet")]), ""]


def _training(m: _Model, mining: dict | None) -> list[str]:
    summary = m.summary
    lines = ["## Training", "", *_table(_hyperparameters(summary)), "", "### Data", "", *_data_section(summary), ""]
    if mining:
        during = isinstance(((summary.get("data") or {}).get("train") or {}).get("mining"), dict)
        where = "during training" if during else "by `hfemb mine` before training"
        lines += ["### Negative mining", "", *_mining_section(mining, where), ""]
    curves = training_curve_summary(m.output_dir / "train_log.jsonl")
    if curves:
        lines += ["### Training curves", "", *_curves_section(curves, (m.output_dir / CURVES_FILE).is_file()), ""]
    final = summary.get("final_eval") or {}
    if summary.get("best_metric") is not None:
        lines += [f"Best checkpoint metric: {_fmt(summary['best_metric'])}"
                  + (f"; final eval loss {_fmt(final['eval_loss'])}." if "eval_loss" in final else "."), ""]
    lines += final_eval_section(summary)
    return lines


def weight_merging_section(m: _Model) -> list[str]:
    """What was done to the trained weights: checkpoint averaging (``hfemb_averaging.json`` beside the weights;
    a failed one from ``train_summary.json``) and interpolation with the base (``hfemb_merge.json`` of
    `hfemb merge-weights`). Read from the folder, so a card never claims it for other weights (an ``adapter/``,
    or a ``merged/`` re-made by `hfemb merge`)."""
    lines = []
    averaging = m.averaging
    failed = m.summary.get("checkpoint_averaging") if not m.adapter else None
    if averaging and averaging.get("k"):
        lines.append(f"- **checkpoint averaging**: the weights are the per-tensor mean (in fp32) of the last "
                     f"{averaging['k']} checkpoints of the run, at steps {_fmt(averaging.get('steps'))}"
                     + (" (each LoRA checkpoint merged onto the base first: the mean of W + BA, not of A and B)"
                        if "LoRA" in str(averaging.get("rule")) else "")
                     + f"; stored in {_fmt(averaging.get('stored_dtype'))}. The evaluation during training reported "
                     "here is of the last step's model, not of this average.")
    elif isinstance(failed, dict) and failed.get("error"):
        lines.append(f"- **checkpoint averaging** (last {failed.get('k')} checkpoints) was configured but failed: "
                     f"{failed['error']}; these weights are the last step's.")
    if m.merge:
        mg = m.merge
        tuned_avg = mg.get("tuned_checkpoint_averaging") or {}
        lines.append(f"- **interpolation with the base** ({mg.get('method')}, alpha {_fmt(mg.get('alpha'))}): "
                     f"{mg.get('rule')}, with base `{mg.get('base')}` and tuned model `{mg.get('tuned')}`"
                     + (f" (itself the mean of its run's last {tuned_avg.get('k')} checkpoints, steps "
                        f"{_fmt(tuned_avg.get('steps'))})" if tuned_avg.get("k") else "")
                     + f" (`hfemb merge-weights`; recorded in `{PROVENANCE_FILE}`).")
    return ["## Weight merging", "", *lines, ""] if lines else []


_EVAL_COLUMNS = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@10", "Recall@10"), ("recall@100", "Recall@100"),
                 ("best_f1", "best F1"), ("best_threshold", "at threshold"), ("roc_auc", "ROC-AUC"))


def final_eval_section(summary: dict) -> list[str]:
    """The evaluators' metrics of the final model (``final_eval``) per eval set: the in-domain set and the named
    ones (``data.eval_files``, e.g. a general-domain set that shows forgetting)."""
    final = summary.get("final_eval") or {}
    sets = [e for e in (summary.get("data") or {}).get("evaluators") or [] if isinstance(e, dict)]
    rows = []
    for ev in sets:
        prefix = "eval_" + (f"{ev['name']}_" if ev.get("name") else "")
        values = {key: final.get(prefix + key) for key, _ in _EVAL_COLUMNS}
        if any(v is not None for v in values.values()):
            label = f"{ev['name']}" if ev.get("name") else "in-domain"
            rows.append((label, Path(str(ev.get("source", ""))).name, ev.get("kind"), values))
    if not rows:
        return []
    used = [(k, title) for k, title in _EVAL_COLUMNS if any(r[3][k] is not None for r in rows)]
    out = ["### Evaluation during training (final model)", "",
           "| eval set | data | kind | " + " | ".join(t for _, t in used) + " |",
           "|---|---|---|" + "---|" * len(used)]
    for label, source, kind, values in rows:
        out.append(f"| {label} | `{source}` | {kind} | " + " | ".join(_fmt(values[k]) for k, _ in used) + " |")
    return out + ["", "Retrieval sets: exact search over the set's documents; pool sets: each query's own candidates "
                  "(`hfemb.training.evaluator`, the code of `run_eval.py`).", ""]


def build_model_card(model_dir: str | os.PathLike, *, output_dir: str | os.PathLike | None = None,
                     repo_id: str | None = None, eval_results: str | os.PathLike | None | bool = None,
                     eval_model_name: str | None = None, base_model: str | None = None,
                     finetune_type: str | None = None) -> ModelCardResult:
    """The card of ``model_dir`` (a merged model or a LoRA adapter folder in the sentence-transformers layout).

    ``output_dir``: the training output it came from (default: the parent when it holds
    ``train_summary.json``). ``eval_results``: a results.json path, None to look for one
    (`discover_eval_results`), False for none. ``repo_id``: used in the usage snippets and title.
    ``base_model`` / ``finetune_type``: when there is no training summary (e.g. `hfemb merge` of a bare adapter).
    """
    from huggingface_hub import ModelCard

    m = _describe(Path(model_dir), output_dir, base_model, finetune_type)
    mining = _mining_report(m.summary) if m.summary else None
    base_meta = base_card_metadata(m.base)
    languages = base_meta.get("language") or []
    languages = [languages] if isinstance(languages, str) else list(languages)
    if m.summary and data_language(m.summary) == "zh" and "zh" not in languages:
        languages.append("zh")
    found = _evaluation(m, eval_results, eval_model_name)
    eval_lines, threshold = _eval_section(found[1], found[2], found[0]) if found else ([], None)
    in_run = m.output_dir is not None and m.folder.name in ("merged", "adapter")
    title = (repo_id or "").split("/")[-1] or (m.output_dir.name if in_run else m.folder.name)

    lines = _overview(m, title, threshold, mined=mining is not None)
    lines += weight_merging_section(m)
    if m.summary:
        lines += _training(m, mining)
    lines += ["## Evaluation", ""]
    lines += eval_lines or ["Not evaluated yet. Run `python run_eval.py --model tuned=OUTPUT_DIR ...`, then "
                            "`hfemb card OUTPUT_DIR` to add the table here (`hfemb push` "
                            "regenerates the card and finds the results too; `--eval-results FILE` names them)."]
    lines += ["", "## Usage", "", *_usage_section(repo_id or str(m.folder), m.prompts, m.pooling, m.max_length,
                                                  threshold["threshold"] if threshold else None,
                                                  "zh" if "zh" in languages else "en", m.adapter), ""]
    if m.summary.get("config"):
        config = json.dumps(clean_config(m.summary["config"]), indent=2, ensure_ascii=False)
        lines += ["## Training configuration", "", "<details><summary>config</summary>", "", "```json", config,
                  "```", "", "</details>", ""]
    card_data = _card_data(m, title, languages, base_meta.get("license"), found, threshold)
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return ModelCardResult(text=str(card), threshold=threshold, eval_results_file=found[0] if found else None)


def write_model_card(model_dir: str | os.PathLike, *, target_dir: str | os.PathLike | None = None,
                     **options) -> ModelCardResult:
    """Write ``README.md`` (and ``hfemb_threshold.json`` when evaluated, ``training_curves.png`` when drawn)
    into ``target_dir`` (default ``model_dir``), each atomically. ``options``: see `build_model_card`."""
    result = build_model_card(model_dir, **options)
    target = Path(target_dir or model_dir)
    if result.threshold is not None:
        write_json(target / THRESHOLD_FILE, result.threshold)
    elif (target / THRESHOLD_FILE).exists():  # from an earlier evaluation of other weights
        (target / THRESHOLD_FILE).unlink()
    output_dir = options.get("output_dir") or (Path(model_dir).parent if (Path(model_dir).parent /
                                                                           "train_summary.json").is_file() else None)
    png = Path(output_dir, CURVES_FILE) if output_dir else None
    if png is not None and png.is_file() and "](training_curves.png)" in result.text:
        with atomic_open(target / CURVES_FILE, "wb") as fh, open(png, "rb") as src:
            shutil.copyfileobj(src, fh)
    with atomic_open(target / "README.md") as fh:
        fh.write(result.text)
    return result


def read_threshold(model_dir: str | os.PathLike) -> float | None:
    """The recommended cosine threshold saved with a model folder, or None."""
    data = _read_json(Path(model_dir) / THRESHOLD_FILE)
    return float(data["threshold"]) if isinstance(data, dict) and data.get("threshold") is not None else None


def check_training_output(folder: str | os.PathLike) -> None:
    """Raise `HfembError` saying what is missing when ``folder`` is not a finished training output."""
    folder = Path(folder)
    if not folder.exists():
        raise HfembError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise HfembError(f"{folder}: is a file; give a training output folder")
    models = [sub for sub in ("merged", "adapter") if (folder / sub).is_dir()]
    missing = ([] if (folder / "train_summary.json").is_file() else ["train_summary.json"]) \
        + ([] if models else ["merged/ or adapter/"])
    if not missing:
        return
    if any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise HfembError(f"{folder}: a model folder, not a training output folder (missing train_summary.json); "
                         f"give the folder it was trained into"
                         + (f", {folder.parent}" if (folder.parent / "train_summary.json").is_file() else ""))
    leftovers = sorted(p.name for p in folder.glob(".merged.*")) + sorted(p.name for p in folder.glob(".adapter.*"))
    checkpoints = sorted(p.name for p in folder.glob("checkpoint-*"))
    state = (f"; it has unfinished save folder(s) {', '.join(leftovers)} (the run was killed while saving)"
             if leftovers else "") + (f"; it has {', '.join(checkpoints[-3:])}: finish the run with "
                                      "`hfemb train CONFIG --resume`" if checkpoints else "")
    raise HfembError(f"{folder}: not a finished training output: missing {' and '.join(missing)}{state}")
