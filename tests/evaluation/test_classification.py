"""Classification over a knowledge base: top-k accuracy (ties count against) by hand, evaluate_classification
with a fake encoder whose scores are designed by hand (pairs file, evaluate() report, top-k, mean rank,
confusions, predictions), and the tiny Qwen3 on the real TCM-SD sample against direct encoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hfemb.evaluation import encoders as eval_models
from hfemb.data.cases import CaseSettings, knowledge_from_candidates, read_knowledge, render_query
from hfemb.evaluation.classification import (PAIRS_FILE, PREDICTIONS_FILE, RESULT_FILE, classification_set, classify,
                                       evaluate_classification, right_entry_ranks, topk_accuracy)

TCM = Path(__file__).parents[1] / "fixtures" / "tcm"
CASES, KB_TSV = TCM / "cases.jsonl", TCM / "knowledge.tsv"


def test_topk_accuracy_by_hand():
    scores = np.array([[0.9, 0.1, 0.0],    # own 0: rank 0
                       [0.5, 0.3, 0.4],    # own 1: 0.5 and 0.4 above -> rank 2
                       [0.2, 0.2, 0.1],    # own 0: tied with entry 1 -> rank 1 (ties count against)
                       [0.1, 0.2, 0.3]])   # own 2: rank 0
    labels = np.array([0, 1, 0, 2])
    assert right_entry_ranks(scores, labels).tolist() == [0, 2, 1, 0]
    assert topk_accuracy(scores, labels, ks=(1, 2, 3)) == {"top1_accuracy": 0.5, "top2_accuracy": 0.75,
                                                          "top3_accuracy": 1.0}


# Fake encoder: knowledge entry j -> e_j; each case query -> a vector designed by hand (5 entries).
QUERY_VECTORS = {
    "c1": [0.9, 0.1, 0.0, 0.0, 0.0],  # own 0 -> rank 0
    "c2": [0.5, 0.3, 0.4, 0.1, 0.0],  # own 1 -> rank 2, top-1 prediction entry 0
    "c3": [0.5, 0.4, 0.1, 0.3, 0.2],  # own 2 -> rank 4, top-1 prediction entry 0
    "c4": [0.0, 0.0, 0.0, 0.5, 0.5],  # own 3, tied with entry 4 -> rank 1, top-1 prediction entry 4
    "c5": [0.0, 0.0, 0.0, 0.0, 1.0],  # own 4 -> rank 0
}


class FakeEncoder:
    query_prompt, document_prompt = "fake query: ", ""

    def __init__(self, queries: dict[str, list[float]], documents: dict[str, list[float]]):
        self.vectors = {**queries, **documents}
        self.calls = 0

    def encode(self, texts, *, is_query, **kw):
        self.calls += 1
        out = np.array([self.vectors.get(t, [1.0] * 5) for t in texts], dtype=np.float64)  # unknown: all tied
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def fake(monkeypatch):
    kb = read_knowledge(KB_TSV)
    rows = [json.loads(line) for line in CASES.read_text("utf-8").splitlines()]
    queries = {render_query(r, CaseSettings(), ("x", 1)): QUERY_VECTORS[r["example_id"]] for r in rows[:5]}
    documents = {text: np.eye(5)[j].tolist() for j, text in enumerate(kb.values())}
    encoder = FakeEncoder(queries, documents)
    monkeypatch.setattr(eval_models, "load_encoder", lambda spec, settings: encoder)
    return encoder, kb


def test_evaluate_classification_with_hand_designed_scores(fake, tmp_path):
    encoder, kb = fake
    names = list(kb)
    report = evaluate_classification({"fake": "fake-model"}, CASES, KB_TSV, output_dir=tmp_path, top_k=(1, 3, 5),
                                     use_cache=False, n_bootstrap=0, plots=False, show_progress=False,
                                     print_table=False)
    cls = report["classification"]
    assert cls["data"]["cases"] == 5 and cls["data"]["entries"] == 5 and cls["data"]["missing_label"] == 1
    assert cls["data"]["first_missing"] == [{"case_id": "c6", "label": "痰湿阻肺证"}]
    m = cls["models"]["fake"]
    # ranks [0, 2, 4, 1, 0]
    assert (m["top1_accuracy"], m["top3_accuracy"], m["top5_accuracy"]) == (0.4, 0.8, 1.0)
    assert m["mean_rank"] == pytest.approx((1 + 3 + 5 + 2 + 1) / 5) and m["cases"] == 5
    assert sorted((c["label"], c["predicted"], c["cases"]) for c in m["confusions"]) == sorted([
        (names[1], names[0], 1), (names[2], names[0], 1), (names[3], names[4], 1)])
    assert json.loads((tmp_path / RESULT_FILE).read_text("utf-8")) == json.loads(json.dumps(cls))

    predictions = [json.loads(line) for line in (tmp_path / PREDICTIONS_FILE).read_text("utf-8").splitlines()]
    assert [p["rank"] for p in predictions] == [1, 3, 5, 2, 1]
    c4 = predictions[3]
    assert [n for n, _ in c4["top"]] == [names[4], names[3], names[0], names[1], names[2]]  # own entry after its tie
    assert c4["top"][0][1] == pytest.approx(np.sqrt(0.5), abs=1e-6)

    # evaluate() saw every case against every entry, label 1 for its own
    pools = [json.loads(line) for line in (tmp_path / PAIRS_FILE).read_text("utf-8").splitlines()]
    assert [[d["label"] for d in p["documents"]] for p in pools] == np.eye(5, dtype=int).tolist()
    assert all([d["content"] for d in p["documents"]] == list(kb.values()) for p in pools)
    assert report["data"]["eval"]["pairs"] == 25 and report["data"]["eval"]["positive_pairs"] == 5
    q = np.array([QUERY_VECTORS[f"c{i}"] for i in range(1, 6)])
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)).ravel()
    assert report["models"]["fake"]["roc_auc"] == pytest.approx(roc_auc_score(np.eye(5).ravel(), scores))
    assert (tmp_path / "results.json").is_file() and (tmp_path / "classification.md").is_file()
    md = (tmp_path / "classification.md").read_text("utf-8")
    assert "| fake | 0.4000 | 0.8000 | 1.0000 | 2.40 |" in md


def test_classify_checks_shapes_and_set_reports_duplicates(tmp_path):
    kb = read_knowledge(KB_TSV)
    kb_dup = {**kb, "重复证": kb["风寒束表证"]}
    data = classification_set(CASES, kb_dup)
    assert data.stats["duplicate_entry_texts"] == 1 and data.stats["entries"] == 6
    assert data.labels.tolist() == [0, 1, 2, 3, 4] and data.case_ids == ["c1", "c2", "c3", "c4", "c5"]
    with pytest.raises(ValueError, match="scores shape"):
        classify(np.zeros((5, 5)), data)
    # identical texts score the same: the own entry can never be alone at the top
    scores = np.tile(np.array([1.0, 0, 0, 0, 0, 1.0]), (5, 1))
    summary, _ = classify(scores, data, (1, 2))
    assert summary["top1_accuracy"] == 0.0 and summary["top2_accuracy"] == 0.2


def test_tiny_qwen3_on_the_real_tcm_sd_sample(shared_data, tiny_qwen3, tmp_path, monkeypatch):
    from hfemb.modeling.loading import load_embedding_model

    loads, real_load = [], eval_models.load_encoder
    monkeypatch.setattr(eval_models, "load_encoder", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    case_file = shared_data / "tcm_sd_sample" / "TCM-SD_data_sample.json"
    kb = knowledge_from_candidates(shared_data / "tcm_sd_sample" / "TCM-SD_data_sample_with_knowledge.json")
    report = evaluate_classification({"tiny": tiny_qwen3}, case_file, kb, output_dir=tmp_path,
                                     cache_dir=str(tmp_path / "cache"), n_bootstrap=0, plots=False,
                                     show_progress=False, print_table=False)
    data = classification_set(case_file, kb)
    model = load_embedding_model(tiny_qwen3)
    q = model.encode(data.queries, is_query=True)
    d = model.encode(data.texts, is_query=False)
    scores = q.astype(np.float64) @ d.astype(np.float64).T  # [5, 23]
    expected = topk_accuracy(scores, data.labels)
    got = report["classification"]["models"]["tiny"]
    assert (got["top1_accuracy"], got["top5_accuracy"]) == (expected["top1_accuracy"], expected["top5_accuracy"])
    predictions = [json.loads(line) for line in (tmp_path / PREDICTIONS_FILE).read_text("utf-8").splitlines()]
    assert [p["rank"] for p in predictions] == (right_entry_ranks(scores, data.labels) + 1).tolist()
    assert [p["top"][0][0] for p in predictions] == [data.names[j] for j in scores.argmax(axis=1)]
    assert report["data"]["eval"]["pairs"] == 5 * 23
    # the top-k pass read the vectors evaluate() cached: the model was loaded once and ran once per text
    assert loads == [tiny_qwen3] and report["models"]["tiny"]["texts_encoded"] == 5 + 23


def test_cli_eval_classify_knowledge(fake, tmp_path, capsys):
    from hfemb.cli import main

    config = tmp_path / "eval.json"
    config.write_text("{}", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["eval", "--config", str(config), "--data", str(CASES), "--classify-knowledge", str(KB_TSV),
            "--model", "fake=fake-model", "--output-dir", str(out), "--no-cache", "--bootstrap", "0", "--no-plots",
            "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| fake | 0.4000 | 1.0000 | 2.40 |" in printed  # top-1, top-5, mean rank (as by hand above)
    assert json.loads((out / RESULT_FILE).read_text("utf-8"))["models"]["fake"]["top1_accuracy"] == 0.4
    # another query template: queries the fake encoder does not know score every entry alike (ties count against)
    assert main(argv + ["--query-template", "{chief_complaint}"]) == 0
    assert "| fake | 0.0000 | 1.0000 | 5.00 |" in capsys.readouterr().out
    assert "恶寒发热2天，无汗。" in [json.loads(line)["query"] for line in (out / PAIRS_FILE).read_text("utf-8").splitlines()]
    assert main(argv + ["--query-template", "{chief_complaint}", "--query-fields", "FDMR"]) == 2
    assert "not both" in capsys.readouterr().err
