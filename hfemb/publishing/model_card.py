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
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hfemb.errors import HfembError
from hfemb.io_utils import atomic_open, write_json
from hfemb.modeling.merge_weights import AVERAGING_FILE, PROVENANCE_FILE, read_merge_record
from hfemb.modeling.st_layout import st_pooling
from hfemb.publishing.card_inputs import (base_card_metadata, data_language, discover_eval_results, find_eval_entry,
                                          is_hub_id, mining_report, read_json, training_curve_summary)
from hfemb.publishing.card_sections import (CURVES_FILE, THRESHOLD_FILE, clean_config, curves_section, data_section,
                                            eval_section, final_eval_section, format_value, hyperparameter_rows,
                                            markdown_table, mining_section, usage_section)


@dataclass
class ModelCardResult:
    text: str  # README.md content
    threshold: dict | None  # hfemb_threshold.json content, when evaluation results were found
    eval_results_file: Path | None


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
    summary = (read_json(output_dir / "train_summary.json") or {}) if output_dir else {}
    model_cfg = (summary.get("config") or {}).get("model") or {}
    adapter_cfg = read_json(model_dir / "adapter_config.json")
    merge = read_merge_record(model_dir)
    return _Model(
        folder=model_dir, output_dir=output_dir, summary=summary, adapter=adapter_cfg is not None,
        base=base_model or model_cfg.get("name_or_path") or (adapter_cfg or {}).get("base_model_name_or_path")
        or (merge or {}).get("base"), merge=merge, averaging=read_merge_record(model_dir, AVERAGING_FILE),
        kind=finetune_type or model_cfg.get("finetune_type") or ("lora" if adapter_cfg is not None else None),
        prompts=(read_json(model_dir / "config_sentence_transformers.json") or {}).get("prompts") or {},
        pooling=st_pooling(str(model_dir)) or "mean",
        max_length=(read_json(model_dir / "sentence_bert_config.json") or {}).get("max_seq_length") or 512)


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
        names = ", ".join(read_json(Path(eval_results))["models"])
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
            "", "## Model", "", *markdown_table([
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
    lines = ["## Training", "", *markdown_table(hyperparameter_rows(summary)), "", "### Data", "",
             *data_section(summary), ""]
    if mining:
        during = isinstance(((summary.get("data") or {}).get("train") or {}).get("mining"), dict)
        where = "during training" if during else "by `hfemb mine` before training"
        lines += ["### Negative mining", "", *mining_section(mining, where), ""]
    curves = training_curve_summary(m.output_dir / "train_log.jsonl")
    if curves:
        lines += ["### Training curves", "", *curves_section(curves, (m.output_dir / CURVES_FILE).is_file()), ""]
    final = summary.get("final_eval") or {}
    if summary.get("best_metric") is not None:
        lines += [f"Best checkpoint metric: {format_value(summary['best_metric'])}"
                  + (f"; final eval loss {format_value(final['eval_loss'])}." if "eval_loss" in final else "."), ""]
    lines += final_eval_section(summary)
    return lines


def _auto_base_merge(m: _Model) -> bool:
    """The run chose its interpolation with the base by itself (``export.base_merge_alpha`` null)."""
    return bool(((m.summary.get("data") or {}).get("base_merge_alpha") or {}).get("auto"))


def alpha_sweep_text(chosen_on) -> str:
    """``alpha: value`` of each alpha a ``chosen_on`` record (`hfemb.training.base_merge_sweep`) scored, or ""."""
    if not (isinstance(chosen_on, dict) and isinstance(chosen_on.get("values"), dict)):
        return ""
    return ", ".join(f"{a}: {format_value(v)}" for a, v in chosen_on["values"].items())


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
                     f"{averaging['k']} checkpoints of the run, at steps {format_value(averaging.get('steps'))}"
                     + (" (each LoRA checkpoint merged onto the base first: the mean of W + BA, not of A and B)"
                        if "LoRA" in str(averaging.get("rule")) else "")
                     + f"; stored in {format_value(averaging.get('stored_dtype'))}. The evaluation during training "
                     "reported here is of the last step's model, not of this average.")
    elif isinstance(failed, dict) and failed.get("error"):
        lines.append(f"- **checkpoint averaging** (last {failed.get('k')} checkpoints) was configured but failed: "
                     f"{failed['error']}; these weights are the last step's.")
    if m.merge:
        mg = m.merge
        tuned_avg = mg.get("tuned_checkpoint_averaging") or {}
        lines.append(f"- **interpolation with the base** ({mg.get('method')}, alpha {format_value(mg.get('alpha'))}): "
                     f"{mg.get('rule')}, with base `{mg.get('base')}` and tuned model `{mg.get('tuned')}`"
                     + (f" (itself the mean of its run's last {tuned_avg.get('k')} checkpoints, steps "
                        f"{format_value(tuned_avg.get('steps'))})" if tuned_avg.get("k") else "")
                     + (f" (after training, `{mg['by']}`"
                        + (" auto: rows mined in corpus mode" if _auto_base_merge(m) else "") + f"; stored in {format_value(mg.get('stored_dtype'))}; recorded in "
                        f"`{PROVENANCE_FILE}`). The evaluation during training reported here is of the model before "
                        "this interpolation." if mg.get("by") else
                        f" (`hfemb merge-weights`; recorded in `{PROVENANCE_FILE}`)."))
        tried = alpha_sweep_text(mg.get("chosen_on"))
        if tried:
            lines.append(f"- **alpha chosen on a dev set**: `{mg['chosen_on'].get('data')}`, the highest "
                         f"{mg['chosen_on'].get('metric')} among alpha {tried}.")
    base_merge = m.summary.get("base_merge")
    chosen = base_merge.get("chosen_on") if isinstance(base_merge, dict) and not base_merge.get("error") else None
    tried = alpha_sweep_text(chosen)
    if not m.merge and not m.adapter and tried and base_merge.get("alpha") == 1:
        lines.append(f"- **interpolation with the base** (`export.base_merge_alphas`, chosen on the run's eval set "
                     f"`{chosen.get('data')}` by {chosen.get('metric')}: alpha {tried}): alpha 1 scored highest, so "
                     "these are the trained weights.")
    if m.adapter and isinstance(base_merge, dict) and not base_merge.get("error") and (base_merge.get("alpha") or 1) < 1:
        lines.append(f"- **`merged/` is not this adapter's model**: after training it was interpolated with the base at "
                     f"alpha {format_value(base_merge['alpha'])} (`export.base_merge_alpha`: the base plus alpha times "
                     "this adapter's change); this adapter holds the trained weights.")
    failed_merge = base_merge if not m.adapter else None
    if not m.merge and isinstance(failed_merge, dict) and failed_merge.get("error"):
        several = isinstance(failed_merge.get("alpha"), list)  # export.base_merge_alphas: the choice failed
        lines.append(f"- **interpolation with the base** (alpha{'s' if several else ''} "
                     f"{format_value(failed_merge.get('alpha'))}, `export.base_merge_alpha{'s' if several else ''}`) "
                     f"was configured but failed: {failed_merge['error']}; these weights are the trained ones.")
    return ["## Weight merging", "", *lines, ""] if lines else []


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
    mining = mining_report(m.summary) if m.summary else None
    base_meta = base_card_metadata(m.base)
    languages = base_meta.get("language") or []
    languages = [languages] if isinstance(languages, str) else list(languages)
    if m.summary and data_language(m.summary) == "zh" and "zh" not in languages:
        languages.append("zh")
    found = _evaluation(m, eval_results, eval_model_name)
    eval_lines, threshold = eval_section(found[1], found[2], found[0]) if found else ([], None)
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
    lines += ["", "## Usage", "", *usage_section(repo_id or str(m.folder), m.prompts, m.pooling, m.max_length,
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
    data = read_json(Path(model_dir) / THRESHOLD_FILE)
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
