"""Markdown sections of a model card from the run's records: hyperparameters, data, mining, curves, eval, usage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hfemb.errors import HfembError
from hfemb.evaluation.report import rule_words, summary_table

THRESHOLD_FILE = "hfemb_threshold.json"
CURVES_FILE = "training_curves.png"
_PATH_KEYS = {"train_file", "eval_file", "output_dir", "logging_dir", "cache_dir"}
_EXAMPLES = {
    "zh": (["高血压患者日常饮食需要注意什么？"],
           ["高血压患者应低盐饮食，每日食盐摄入不超过5克，多吃蔬菜水果，戒烟限酒。"]),
    "en": (["What should people with high blood pressure eat?"],
           ["People with hypertension should eat less salt and more vegetables and fruit, and limit alcohol."]),
}


def format_value(value: Any) -> str:
    """A value as the card shows it: floats to 4 significant digits, lists comma-joined, None as "–"."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "–" if value is None else str(value)


def markdown_table(rows: list[tuple[str, Any]]) -> list[str]:
    """The lines of a two-column Markdown table of (label, value) rows."""
    return ["| | |", "|---|---|", *(f"| {k} | {format_value(v)} |" for k, v in rows)]


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


def hyperparameter_rows(summary: dict) -> list[tuple[str, Any]]:
    """(label, value) rows of the training set-up in ``train_summary.json``: optimiser, loss, LoRA, size, time."""
    cfg = summary.get("config", {})
    m, t, lora, loss, data = (cfg.get(k) or {} for k in ("model", "training", "lora", "loss", "data"))
    per_row = (summary.get("data") or {}).get("negatives_per_row", data.get("num_negatives"))
    pooled = bool((summary.get("data") or {}).get("pool_negatives"))  # drawn from each row's whole pool
    resolved = (summary.get("data") or {}).get("temperature") or {}  # run_training's: value, auto, mined_modes
    modes = set(resolved.get("mined_modes") or [])
    why = "" if not resolved.get("auto") else \
        f" (auto: rows mined in {next(iter(modes))} mode)" if len(modes) == 1 and None not in modes else " (auto)"
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
            ("loss", f"InfoNCE, temperature {loss.get('temperature')}{why}, "
                     f"{'in-batch + ' if loss.get('in_batch_negatives', True) else ''}{per_row} "
                     f"{'' if pooled else 'hard/easy '}negatives per query"
                     + (", false negatives masked" if loss.get("mask_false_negatives") else "")
                     + (f", + {str(loss.get('distill_loss', 'kl')).upper()} distillation from the rows' teacher "
                        f"scores, weight {loss['distill_weight']}" if loss.get("distill_weight") else "")),
            ("max length (query / passage)", f"{data.get('query_max_len')} / {data.get('passage_max_len')}"),
            ("seed", t.get("seed"))]
    redraw = (summary.get("data") or {}).get("redraw_negatives") or {}
    simans = redraw.get("sampling") == "simans"  # SimANS draws from epoch 0 on, uniform draws from epoch 1
    if redraw.get("rows") and (simans or float((summary.get("train") or {}).get("epoch") or 0) > 1):
        rows.insert(rows.index(next(r for r in rows if r[0] == "loss")) + 1,
                    ("negatives", f"redrawn every epoch{', the first too' if simans else ' after the first'}, "
                                  + ("from all of each row's candidates, pools and negatives together"
                                     if pooled else
                                     "from each row's mined pools or longer negative list")
                                  + f" ({redraw['rows']:,} of {redraw['of']:,} rows)"
                                  + (", the ones the teacher scores near the positive more often (SimANS)"
                                     if simans else "")))
    if m.get("finetune_type") in ("lora", "qlora"):
        targets = lora.get("target_modules") or "q,k,v,o,gate,up,down projections"
        rows.insert(0, ("LoRA", f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
                                f"targets {format_value(targets)}"))
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


def data_section(summary: dict) -> list[str]:
    """One Markdown bullet per data part of ``train_summary.json``: file, format, records -> rows, what was left out."""
    out = []
    for part, info in (summary.get("data") or {}).items():
        if not isinstance(info, dict) or not ("file" in info or info.get("from") == "eval_ratio"):
            continue  # run-level entries (temperature, redraws, ...) go to the hyperparameters
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


def mining_section(report: dict, where: str) -> list[str]:
    """The BM25 settings and counts of a mining report (mined ``where``), as Markdown lines."""
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
    return [f"Negatives were mined with BM25 ({where}):", "", *markdown_table(rows)]


def curves_section(curves: list[dict], has_png: bool) -> list[str]:
    """The first / last / best table of `training_curve_summary` rows, and the curves image when drawn."""
    out = ["| metric | first (step) | last (step) | best (step) |", "|---|---|---|---|"]
    for c in curves:
        arrow = "↓" if c["lower_is_better"] else "↑"
        cells = [f"{format_value(c[k][1])} ({c[k][0]})" for k in ("first", "last", "best")]
        out.append(f"| {c['metric']} {arrow} | " + " | ".join(cells) + " |")
    if has_png:
        out += ["", f"![training curves]({CURVES_FILE})"]
    return out


def eval_section(report: dict, name: str, results_file: Path) -> tuple[list[str], dict]:
    """The run_eval.py results of model ``name`` as Markdown lines, and its ``hfemb_threshold.json`` content."""
    m = report["models"][name]
    data = (report.get("data") or {}).get("eval") or {}
    try:
        table = summary_table(report)
    except (KeyError, TypeError, IndexError) as exc:
        raise HfembError(f"{results_file}: not a complete results.json from run_eval.py (missing {exc})") from None
    threshold = {
        "threshold": m["chosen_threshold"], "similarity": "cosine",
        "rule": "relevant when cosine(query embedding with the query prompt, document embedding) >= threshold",
        "chosen_on": m.get("chosen_on"), "chosen_by": m.get("threshold_rule", "best"), "f1": m.get("f1_at_chosen"),
        "precision": m.get("precision_at_chosen"),
        "recall": m.get("recall_at_chosen"), "threshold_ci95": m.get("chosen_threshold_ci"),
        "eval_data": Path(str(data.get("path", ""))).name or None, "model_name_in_results": name,
    }
    on = "the dev set" if m.get("chosen_on") == "dev" else "the evaluation set itself (optimistic: no dev set)"
    out = [f"Threshold-sweep evaluation with `run_eval.py` on `{threshold['eval_data']}` ({data.get('pairs')} "
           f"query–document pairs, {data.get('positive_pairs')} relevant, {data.get('queries')} queries); a pair is "
           "predicted relevant when the cosine similarity is at least the threshold. This model is "
           f"**{name}**.", "", table, "",
           f"**Recommended threshold: {format_value(m['chosen_threshold'])}** ({rule_words(m)} on {on}; F1 "
           f"{format_value(m.get('f1_at_chosen'))}, precision {format_value(m.get('precision_at_chosen'))}, recall "
           f"{format_value(m.get('recall_at_chosen'))} on the evaluation set). It is also saved in `{THRESHOLD_FILE}`."]
    return out, threshold


def usage_section(model_id: str, prompts: dict, pooling: str, max_length: int, threshold: float | None,
                   language: str, adapter: bool) -> list[str]:
    """Usage snippets (sentence-transformers, plain transformers) for this model's prompts, pooling and threshold."""
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
        out.append(f"| {label} | `{source}` | {kind} | " + " | ".join(format_value(values[k]) for k, _ in used) + " |")
    return out + ["", "Retrieval sets: exact search over the set's documents; pool sets: each query's own candidates "
                  "(`hfemb.training.evaluator`, the code of `run_eval.py`).", ""]
