"""What a model card reads: run files, the base model's card, the training-log summary, the matching results.json."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from hfemb.errors import HfembError
from hfemb.evaluation.encoders import resolve_model_path
from hfemb.io_utils import read_json
from hfemb.mining.mine import report_beside

log = logging.getLogger("hfemb.publishing.card_inputs")

_LOWER_IS_BETTER = ("loss", "negative_similarity")
_LOG_SKIP = ("runtime", "per_second", "total_flos", "epoch", "step", "grad_norm", "learning_rate",
             "best_threshold")  # a threshold is a setting, not a quality: no "best" of it


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
    report = read_json(results_file)
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


def mining_report(summary: dict) -> dict | None:
    """The run's mining report: from ``train_summary.json`` when mined during training, else the report written
    beside the training file by `hfemb mine`, else None."""
    train = (summary.get("data") or {}).get("train") or {}
    if isinstance(train.get("mining"), dict):
        return train["mining"]

    file = train.get("file")
    return report_beside(file) if file else None
