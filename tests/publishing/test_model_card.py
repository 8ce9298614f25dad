"""Model cards of a real training output (tiny Qwen3, 2 LoRA steps) evaluated by the real `evaluate()`:
Hub YAML, values taken from train_summary / train_log / results.json, the recommended threshold, usage
snippets that reproduce hfemb's embeddings, results.json discovery, no token anywhere."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from hfemb.errors import HfembError
from hfemb.publishing.card_inputs import training_curve_summary
from hfemb.publishing.card_sections import THRESHOLD_FILE, format_value
from hfemb.publishing.model_card import build_model_card, read_threshold, write_model_card

QUERIES = ["高血压患者日常饮食需要注意什么？", "头痛", "How long should a cough last before I see a doctor about it at all?"]
DOCUMENTS = ["低盐饮食。", "高血压患者应低盐饮食，每日食盐摄入不超过5克，多吃蔬菜水果，戒烟限酒，保持规律作息和适量运动。",
             "A cough that lasts more than three weeks should be checked."]


def _write_mined(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(records):
            negs = [records[(i + 5) % len(records)].positives[0], records[(i + 11) % len(records)].positives[0]]
            fh.write(json.dumps({"query": r.query, "positive": r.positives[0], "negative": negs},
                                ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_qwen3, zh_sample_csv):
    """A training output (adapter/, merged/, log with eval metrics) and results.json from `evaluate()`."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from test_trainer import make_config

    from hfemb.data.formats import read_records
    from hfemb.evaluation.evaluate import evaluate
    from hfemb.training.runner import run_training

    root = tmp_path_factory.mktemp("card")
    records = read_records(str(zh_sample_csv)).records
    _write_mined(root / "train.jsonl", records[:24])
    _write_mined(root / "test.jsonl", records[100:124])
    out = root / "run"
    cfg = make_config(tiny_qwen3, str(root / "train.jsonl"), out, data={"eval_ratio": 0.25},
                      training={"max_steps": 2, "eval_strategy": "steps", "eval_steps": 1, "save_strategy": "steps",
                                "save_steps": 2, "learning_rate": 5e-3})
    run_training(cfg)
    report = evaluate({"base": tiny_qwen3, "tuned": str(out / "merged")}, str(root / "test.jsonl"), split_dev=0.5,
                      thresholds="0.0:0.9:0.05", output_dir=str(root / "eval_output"), print_table=False,
                      n_bootstrap=20, plots=False, use_cache=False, show_progress=False)
    return {"root": root, "out": out, "results": root / "eval_output" / "results.json", "report": report,
            "tiny": tiny_qwen3}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run_snippet(code: str) -> tuple[np.ndarray, np.ndarray]:
    code = re.sub(r"^queries = .*$", f"queries = {QUERIES!r}", code, flags=re.M)
    code = re.sub(r"^documents = .*$", f"documents = {DOCUMENTS!r}", code, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "<card snippet>", "exec"), namespace)
    q, d = namespace["query_embeddings"], namespace["document_embeddings"]
    return np.asarray(q.numpy() if hasattr(q, "numpy") else q), np.asarray(d.numpy() if hasattr(d, "numpy") else d)


def test_run_training_writes_cards(trained):
    for sub in ("merged", "adapter"):
        text = (trained["out"] / sub / "README.md").read_text(encoding="utf-8")
        assert "More Information Needed" not in text  # peft's empty template is replaced
        card = ModelCard.load(trained["out"] / sub / "README.md")
        assert card.data.library_name == "sentence-transformers"
        assert card.data.pipeline_tag == "sentence-similarity"
        assert {"sentence-transformers", "feature-extraction", "hfemb", "lora"} <= set(card.data.tags)
        assert ("peft" in card.data.tags) == (sub == "adapter")
        assert "Not evaluated yet" in text  # evaluation runs after training


def test_card_values_come_from_the_run(trained):
    out, report = trained["out"], trained["report"]
    result = build_model_card(out / "merged", eval_results=trained["results"])
    card = ModelCard(result.text)
    data = card.data
    # a local base is not a valid Hub base_model, and no license is invented
    assert data.base_model is None and data.license is None
    assert data.language == ["zh"]  # the training file is Chinese
    summary = json.loads((out / "train_summary.json").read_text())
    assert "| learning rate | 0.005 |" in result.text
    assert "| batch size per device × gradient accumulation | 4 × 1 |" in result.text
    assert "| LoRA | r 4, alpha 8, dropout 0.0, targets q,k,v,o,gate,up,down projections |" in result.text
    p = summary["parameters"]
    assert f"{p['trainable']:,} of {p['total']:,} ({100 * p['trainable'] / p['total']:.2f}%)" in result.text
    train = summary["data"]["train"]
    assert f"`train.jsonl` (hfemb): {train['records']} records → {train['rows']} train rows" in result.text
    assert f"{summary['data']['eval']['rows']} rows held out from the training queries (ratio 0.25" in result.text
    # curves: first/last/best by hand from the log
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    best = min(losses, key=lambda sv: sv[1])
    assert (f"| loss ↓ | {format_value(losses[0][1])} ({losses[0][0]}) | "
            f"{format_value(losses[-1][1])} ({losses[-1][0]}) | {format_value(best[1])} ({best[0]}) |") in result.text
    summary_curves = {c["metric"]: c for c in training_curve_summary(out / "train_log.jsonl")}
    assert summary_curves["loss"]["first"] == losses[0] and summary_curves["loss"]["best"] == best
    eval_losses = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert summary_curves["eval_loss"]["last"] == (max(eval_losses), eval_losses[max(eval_losses)])
    # evaluation: run_eval's own table, this model's chosen threshold
    from hfemb.evaluation.report import summary_table

    tuned = report["models"]["tuned"]
    assert summary_table(report) in result.text
    assert "This model is **tuned**" in result.text
    assert result.threshold["threshold"] == tuned["chosen_threshold"]
    assert result.threshold["chosen_on"] == "dev" and result.threshold["f1"] == tuned["f1_at_chosen"]
    assert result.threshold["chosen_by"] == tuned["threshold_rule"] == "bagged"  # run_eval's default rule
    assert "(bagged best F1 on the dev set; F1 " in result.text
    metrics = {r.metric_type: r for r in data.eval_results}
    assert metrics["f1"].metric_value == pytest.approx(tuned["f1_at_chosen"])
    assert metrics["f1"].metric_args == {"threshold": tuned["chosen_threshold"], "similarity": "cosine"}
    assert metrics["roc_auc"].metric_value == pytest.approx(tuned["roc_auc"]) and not metrics["roc_auc"].metric_args
    assert metrics["average_precision"].metric_value == pytest.approx(tuned["average_precision"])
    assert f"relevant = scores >= {tuned['chosen_threshold']!r}" in result.text


def test_threshold_file_and_training_curves_png(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    (out / "training_curves.png").write_bytes(b"\x89PNG fake")
    result = write_model_card(out / "merged", eval_results=trained["results"], eval_model_name="tuned")
    saved = json.loads((out / "merged" / THRESHOLD_FILE).read_text())
    assert saved == result.threshold and read_threshold(out / "merged") == saved["threshold"]
    assert (out / "merged" / "training_curves.png").read_bytes() == b"\x89PNG fake"
    assert "![training curves](training_curves.png)" in (out / "merged" / "README.md").read_text()
    # config_sentence_transformers.json is left exactly as sentence-transformers reads and writes it
    assert "threshold" not in (out / "merged" / "config_sentence_transformers.json").read_text()
    # rewriting without evaluation removes the stale threshold
    write_model_card(out / "merged", eval_results=False)
    assert not (out / "merged" / THRESHOLD_FILE).exists() and read_threshold(out / "merged") is None


@pytest.mark.parametrize("sub", ["merged", "adapter"])
def test_usage_snippets_reproduce_hfemb(trained, sub):
    from hfemb.modeling.loading import load_embedding_model

    folder = trained["out"] / sub
    model = load_embedding_model(str(folder))
    want_q = model.encode(QUERIES, is_query=True)
    want_d = model.encode(DOCUMENTS, is_query=False)
    blocks = _python_blocks(build_model_card(folder, eval_results=False).text)
    assert len(blocks) == 2 and "SentenceTransformer(" in blocks[0] and "AutoModel" in blocks[1]
    for code in blocks:  # sentence-transformers, then plain transformers
        q, d = _run_snippet(code)
        np.testing.assert_allclose(q, want_q, atol=1e-5)
        np.testing.assert_allclose(d, want_d, atol=1e-5)
    base_q = load_embedding_model(trained["tiny"]).encode(QUERIES, is_query=True)
    assert np.abs(base_q - want_q).max() > 1e-3  # the fine-tuned weights (or the adapter) were really used


def test_snippet_for_mean_pooling_model(minilm, tmp_path):
    from hfemb.modeling.loading import load_embedding_model

    model = load_embedding_model(minilm)
    model.save_pretrained(tmp_path / "m")
    texts = ["a short one", "a much longer sentence about the weather in the mountains today"]
    blocks = _python_blocks(build_model_card(tmp_path / "m", eval_results=False, base_model=minilm).text)
    for code in blocks:
        code = re.sub(r"^queries = .*$", f"queries = {texts!r}", code, flags=re.M)
        code = re.sub(r"^documents = .*$", f"documents = {texts!r}", code, flags=re.M)
        ns: dict = {}
        exec(code, ns)
        q = ns["query_embeddings"]
        np.testing.assert_allclose(np.asarray(q.numpy() if hasattr(q, "numpy") else q),
                                   model.encode(texts, is_query=True), atol=1e-5)


def test_eval_results_discovery(trained, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    report = json.loads(trained["results"].read_text())
    report["models"]["tuned"]["model"] = str(out)  # a training output folder names its merged/ model
    monkeypatch.chdir(tmp_path)
    # a newer results.json that evaluated other models only is skipped
    other = json.loads(json.dumps(report))
    other["models"] = {"base": other["models"]["base"]}
    (tmp_path / "eval_output" / "a").mkdir(parents=True)
    (tmp_path / "eval_output" / "results.json").write_text(json.dumps(report))
    (tmp_path / "eval_output" / "a" / "results.json").write_text(json.dumps(other))
    found = build_model_card(out / "merged")
    assert found.eval_results_file == Path("eval_output/results.json")
    # OUTPUT/eval/results.json wins over eval_output/
    report["models"]["tuned"]["model"] = "run/merged"  # relative to the working directory
    report["models"]["tuned"]["chosen_threshold"] = 0.123
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text(json.dumps(report))
    found = build_model_card(out / "adapter")  # the adapter card takes the merged model's evaluation
    assert found.eval_results_file == out / "eval" / "results.json" and found.threshold["threshold"] == 0.123
    # a name without a file: that model's entry in the discovered file, or an error naming the name
    named = build_model_card(out / "merged", eval_model_name="base")
    assert named.eval_results_file == out / "eval" / "results.json"
    assert named.threshold["model_name_in_results"] == "base"
    assert named.threshold["threshold"] == report["models"]["base"]["chosen_threshold"]
    with pytest.raises(HfembError, match="--eval-model 'nope': no results.json names it"):
        build_model_card(out / "merged", eval_model_name="nope")
    # an explicit file that does not name this model: a clear error, unless the name is given
    with pytest.raises(HfembError, match="--eval-model"):
        build_model_card(out / "merged", eval_results=tmp_path / "eval_output" / "a" / "results.json")
    # results older than the weights evaluated an earlier run written to the same folder: not used
    weights_time = (out / "merged" / "model.safetensors").stat().st_mtime
    os.utime(out / "eval" / "results.json", (weights_time - 10, weights_time - 10))
    os.utime(tmp_path / "eval_output" / "results.json", (weights_time - 10, weights_time - 10))
    assert build_model_card(out / "merged").eval_results_file is None
    named = build_model_card(out / "merged", eval_results=tmp_path / "eval_output" / "a" / "results.json",
                             eval_model_name="base")
    assert named.threshold["model_name_in_results"] == "base"
    with pytest.raises(HfembError, match="no model named 'nope'"):
        build_model_card(out / "merged", eval_results=trained["results"], eval_model_name="nope")


def test_hub_base_gets_base_model_and_its_license_from_the_cache(trained, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = json.loads((out / "train_summary.json").read_text())
    summary["config"]["model"]["name_or_path"] = "Qwen/Qwen3-Embedding-0.6B"
    (out / "train_summary.json").write_text(json.dumps(summary))
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    card = ModelCard(build_model_card(out / "merged", eval_results=False).text)
    assert card.data.base_model == "Qwen/Qwen3-Embedding-0.6B" and card.data.license is None  # not cached: unknown
    snapshot = cache / "models--Qwen--Qwen3-Embedding-0.6B" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# base\n")
    (cache / "models--Qwen--Qwen3-Embedding-0.6B" / "refs").mkdir()
    (cache / "models--Qwen--Qwen3-Embedding-0.6B" / "refs" / "main").write_text("a" * 40)
    card = ModelCard(build_model_card(out / "merged", eval_results=False).text)
    assert card.data.license == "apache-2.0" and card.data.language == ["en", "zh"]
    assert "[Qwen/Qwen3-Embedding-0.6B](https://huggingface.co/Qwen/Qwen3-Embedding-0.6B)" in card.text


def test_no_token_or_local_paths_in_the_card(trained, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = json.loads((out / "train_summary.json").read_text())
    summary["config"]["training"].update({"hub_token": "hf_SECRETinSUMMARY", "push_to_hub": True,
                                          "hub_model_id": "alice/x"})
    (out / "train_summary.json").write_text(json.dumps(summary))
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETinENV")
    text = build_model_card(out / "merged", eval_results=False).text
    assert "hf_SECRET" not in text and "hub_" not in text and "push_to_hub" not in text
    assert str(tmp_path) not in text.replace(str(out / "merged"), "")  # only file names, except the model id


def test_training_curve_summary_by_hand(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "accuracy": 0.1, "learning_rate": 1e-4, "grad_norm": 9.0},
            {"step": 2, "loss": 1.5, "accuracy": 0.4},
            {"step": 2, "eval_loss": 2.0, "eval_negative_similarity": 0.5, "eval_runtime": 1.0},
            {"step": 3, "loss": float("nan")},
            {"step": 4, "loss": 2.5, "accuracy": 0.3},
            {"step": 4, "eval_loss": 2.2, "eval_negative_similarity": 0.3},
            {"step": 4, "train_runtime": 10.0, "train_loss": 2.3},
            {"step": 4, "eval_loss": 2.1, "eval_negative_similarity": 0.3}]  # the final evaluate() repeats step 4
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = {c["metric"]: c for c in training_curve_summary(tmp_path / "log.jsonl")}
    assert set(got) == {"loss", "accuracy", "eval_loss", "eval_negative_similarity"}
    assert got["loss"]["first"] == (1, 3.0) and got["loss"]["last"] == (4, 2.5) and got["loss"]["best"] == (2, 1.5)
    assert got["accuracy"]["best"] == (2, 0.4) and not got["accuracy"]["lower_is_better"]
    assert got["eval_loss"]["last"] == (4, 2.1) and got["eval_loss"]["best"] == (2, 2.0)
    assert got["eval_negative_similarity"]["best"] == (4, 0.3) and got["eval_negative_similarity"]["lower_is_better"]
    assert all(not math.isnan(c["last"][1]) for c in got.values())


def test_failed_card_leaves_the_folder_unchanged(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = (out / "merged" / "README.md").read_bytes()
    bad = tmp_path / "results.json"
    bad.write_text('{"models": {"tuned": {"model": "%s"}}}' % (out / "merged"))  # names it, but incomplete
    with pytest.raises(HfembError, match="not a complete results.json"):
        write_model_card(out / "merged", eval_results=bad)
    assert (out / "merged" / "README.md").read_bytes() == before
    assert not (out / "merged" / THRESHOLD_FILE).exists()
    assert sorted(p.name for p in (out / "merged").iterdir() if p.name.startswith(".")) == []


def test_command_line(trained, tmp_path, capsys):
    from hfemb.cli import main

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    assert main(["card", str(out), "--eval-results", str(trained["results"])]) == 2  # it evaluated the original folder
    assert "none of its models (base, tuned)" in capsys.readouterr().err
    assert main(["card", str(out), "--eval-results", str(trained["results"]), "--eval-model", "tuned"]) == 0
    printed = capsys.readouterr().out
    chosen = trained["report"]["models"]["tuned"]["chosen_threshold"]
    assert f"wrote {out / 'merged' / 'README.md'} (threshold {chosen:.4f} from {trained['results']})" in printed
    assert read_threshold(out / "merged") == read_threshold(out / "adapter") == chosen
    assert main(["card", str(out / "merged")]) == 2
    assert f"a model folder, not a training output folder (missing train_summary.json); give the folder it " \
           f"was trained into, {out}" in capsys.readouterr().err
