"""Evaluation end to end on the real MiniLM and the tiny Qwen3: values against sklearn on scores computed the
reference way (each query encoded with its own documents), the embedding cache, dev thresholds, reports, CLI."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
import weakref

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from hfemb.evaluation import encoders as eval_models
from hfemb.evaluation.metrics import bagged_threshold
from hfemb.cli import main as cli_main
from hfemb.data.records import Record
from hfemb.errors import ConfigError, DataError, HfembError
from hfemb.evaluation.encoders import default_models, encode_texts, latest_training_output, parse_model_args
from hfemb.data.splits import split_by_query
from hfemb.evaluation.evaluate import evaluate, pairs_from_records
from hfemb.evaluation.settings import EvalSettings

TOPICS = {
    "cats": (["what animal purrs", "facts about kittens"],
             ["Cats are small domesticated carnivorous mammals.", "A cat purrs when it is content.",
              "Kittens are young cats."]),
    "python": (["how to install packages in python", "what is python"],
               ["Python is a programming language.", "Python code uses indentation for blocks.",
                "Pip installs Python packages."]),
    "rain": (["why does it rain", "how to stay dry outside"],
             ["Rain is liquid water falling from clouds.", "Umbrellas keep you dry in the rain.",
              "Heavy rain can cause floods."]),
    "coffee": (["what is espresso", "does coffee keep you awake"],
               ["Coffee is brewed from roasted beans.", "Espresso is a concentrated coffee.",
                "Caffeine in coffee keeps people awake."]),
}


def _pools(part: int) -> list[dict]:
    rows = []
    for topic, (queries, _) in TOPICS.items():
        docs = [{"content": d, "label": int(t == topic)} for t, (_, ds) in TOPICS.items() for d in ds]
        rows.append({"query": queries[part], "documents": docs})
    return rows


@pytest.fixture()
def eval_files(tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in _pools(1)))
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(_pools(0)))
    return str(test), str(dev)


@pytest.fixture()
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def _reference_scores(model_path: str, rows: list[dict]):
    """The reference blog's way: encode each query with its whole document list, per query."""
    from hfemb.modeling.loading import load_embedding_model

    model = load_embedding_model(model_path)
    labels, scores = [], []
    for row in rows:
        q = model.encode([row["query"]], is_query=True)
        d = model.encode([doc["content"] for doc in row["documents"]], is_query=False)
        scores += (d @ q[0]).tolist()
        labels += [doc["label"] for doc in row["documents"]]
    return np.array(labels), np.array(scores)


# ------------------------------------------------------------------------------------------- pairs
def test_pairs_from_records_candidates_negatives_duplicates():
    records = [
        Record("q1", ["a"], ["b"], candidates=[("a", 2), ("b", 0), ("c", 1)]),
        Record("q2", ["a"], ["b", "c"]),  # mined row: positive 1, negatives 0
        Record("q2", ["d"], ["b", "c"]),  # same query, second positive: shared negatives are repeats
        Record("q3", ["x"], candidates=[("x", 1), ("x", 0)]),  # conflicting labels: highest kept
    ]
    p = pairs_from_records(records, label_threshold=2)
    got = sorted((p.queries[q], p.documents[d], int(l)) for q, d, l in zip(p.query_index, p.doc_index, p.labels))
    assert got == [("q1", "a", 2), ("q1", "b", 0), ("q1", "c", 1), ("q2", "a", 1), ("q2", "b", 0), ("q2", "c", 0),
                   ("q2", "d", 1), ("q3", "x", 1)]
    assert p.queries == ["q1", "q2", "q3"] and p.documents == ["a", "b", "c", "d", "x"]
    assert p.stats["duplicate_pairs_dropped"] == 3 and p.stats["label_conflicts"] == 1
    assert p.stats["positive_pairs"] == 1  # only label >= 2 is relevant here
    assert p.stats["queries_with_positive"] == 1


def test_split_by_query_is_seeded_disjoint_and_keeps_query_records_together():
    records = [Record(f"q{i % 7}", [f"d{i}"]) for i in range(30)]
    dev, test = split_by_query(records, 0.3, seed=1)
    assert {r.query for r in dev}.isdisjoint({r.query for r in test})
    assert len({r.query for r in dev}) == 2 and len(dev) + len(test) == 30
    assert split_by_query(records, 0.3, seed=1) == (dev, test)
    assert split_by_query(records, 0.3, seed=2) != (dev, test)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        split_by_query(records, 1.0)


# ------------------------------------------------------------------------------------- end to end
def test_evaluate_matches_reference_per_query_encoding(minilm, tiny_qwen3, eval_files, cache_dir, tmp_path):
    test, dev = eval_files
    report = evaluate({"minilm": minilm, "tiny": tiny_qwen3}, test, dev_path=dev, thresholds="0.1:0.7",
                      output_dir=tmp_path / "out", cache_dir=cache_dir, n_bootstrap=200, print_table=False,
                      show_progress=False)
    rows = _pools(1)
    for name, path in (("minilm", minilm), ("tiny", tiny_qwen3)):
        res = report["models"][name]
        y, s = _reference_scores(path, rows)
        assert [r["threshold"] for r in res["sweep"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
        for row in res["sweep"]:
            pred = (s >= row["threshold"]).astype(int)
            # scores may differ in the last float32 bit (batch padding); none is that close to a threshold here
            assert np.min(np.abs(s - row["threshold"])) > 1e-6
            assert row["f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
            assert row["precision"] == pytest.approx(precision_score(y, pred, zero_division=0), abs=1e-12)
            assert row["recall"] == pytest.approx(recall_score(y, pred, zero_division=0), abs=1e-12)
        assert res["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
        # threshold chosen on dev, F1 measured on test at it
        y_dev, s_dev = _reference_scores(path, _pools(0))
        assert res["chosen_on"] == "dev"
        assert res["dev"]["best_f1"] == pytest.approx(max(f1_score(y_dev, s_dev >= t) for t in s_dev), abs=1e-9)
        # the default rule: the bagged median of resampled best-F1 thresholds of the dev pairs (queries in order)
        dev_groups = np.repeat(np.arange(len(_pools(0))), len(_pools(0)[0]["documents"]))
        assert res["threshold_rule"] == "bagged" and res["chosen_threshold"] == pytest.approx(
            bagged_threshold(dev_groups, y_dev, s_dev, n_boot=200, seed=0), abs=1e-6)
        assert res["f1_at_chosen"] == pytest.approx(f1_score(y, s >= res["chosen_threshold"] - 1e-6), abs=1e-9)
        assert res["f1_at_chosen_ci"][0] <= res["f1_at_chosen"] <= res["f1_at_chosen_ci"][1]
        # each distinct text encoded once: 4 test + 4 dev queries, 12 documents
        assert res["texts_encoded"] == 8 + 12 and res["texts_from_cache"] == 0
    assert report["models"]["tiny"]["query_prompt"].startswith("Instruct: Given a web search query")
    assert report["models"]["minilm"]["query_prompt"] == "" and report["models"]["tiny"]["document_prompt"] == ""
    # MiniLM separates these topics; the random tiny model does not
    assert report["models"]["minilm"]["f1_at_chosen"] > 0.8 > report["models"]["tiny"]["f1_at_chosen"]
    assert report["models"]["tiny"]["f1_diff_vs_first_ci"][1] < 0
    ranking = report["models"]["minilm"]["ranking"]
    assert ranking["queries"] == 4 and ranking["recall@1"] == pytest.approx(1 / 3)  # 3 relevant per query

    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["models"]["minilm"]) >= {"model", "sweep", "best_f1", "best_threshold", "roc_auc",
                                              "average_precision", "chosen_threshold", "f1_at_chosen_ci"}
    assert saved["data"]["eval"]["pairs"] == 48 and saved["settings"]["thresholds"][0] == 0.1
    md = (out / "results.md").read_text()
    assert md.splitlines()[4] == "| threshold | minilm F1 | tiny F1 |"
    assert f"| 0.4 | **{report['models']['minilm']['sweep'][3]['f1']:.4f}** |" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "model,threshold,precision,recall,f1,accuracy,positive_rate" and len(csv_lines) == 15
    for png in ("f1_vs_threshold.png", "pr_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cache_returns_identical_vectors_and_is_invalidated(minilm, tmp_path, cache_dir, monkeypatch):
    settings = EvalSettings(cache_dir=cache_dir, show_progress=False, instruction="Find the topic")
    queries, docs = ["what is a cat", "rain"], ["Cats purr.", "Rain falls.", "what is a cat"]
    first = encode_texts(minilm, "m", queries, docs, settings)
    assert first.info["texts_encoded"] == 5

    loads = []
    real_load = eval_models.load_encoder
    monkeypatch.setattr(eval_models, "load_encoder", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    again = encode_texts(minilm, "m", queries, docs, settings)
    assert again.info["texts_encoded"] == 0 and loads == []  # fully cached: the model is not even loaded
    assert again.info["query_prompt"] == "Instruct: Find the topic\nQuery:"
    np.testing.assert_array_equal(again.queries, first.queries)
    np.testing.assert_array_equal(again.documents, first.documents)
    # the same text as query and as document has different prompts, so different vectors
    assert not np.allclose(first.queries[0], first.documents[2])

    partial = encode_texts(minilm, "m", queries + ["new query"], docs, settings)
    assert partial.info["texts_encoded"] == 1 and len(loads) == 1
    np.testing.assert_array_equal(partial.queries[:2], first.queries)

    # prompt change -> query vectors recomputed (documents keep their empty prompt and stay cached; the query
    # "what is a cat" now has the documents' empty prompt, so it is found among them: only "rain" is new)
    no_prompt = encode_texts(minilm, "m", queries, docs, EvalSettings(cache_dir=cache_dir, show_progress=False))
    assert no_prompt.info["texts_encoded"] == 1 and no_prompt.info["query_prompt"] == ""
    assert not np.allclose(no_prompt.queries, first.queries)
    np.testing.assert_array_equal(no_prompt.documents, first.documents)
    np.testing.assert_array_equal(no_prompt.queries[0], first.documents[2])  # no prompt: query = document vector

    # model change (weights file rewritten) -> everything recomputed
    copy = tmp_path / "copy"
    shutil.copytree(minilm, copy)
    assert encode_texts(str(copy), "m", queries, docs, settings).info["texts_encoded"] == 5
    os.utime(copy / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert encode_texts(str(copy), "m", queries, docs, settings).info["texts_encoded"] == 5
    # settings that change vectors are part of the key; others are not
    key = eval_models.model_fingerprint
    base = key(minilm, settings)
    for change in ({"max_length": 16}, {"dtype": "bfloat16"}, {"pooling": "cls"}, {"truncate_dim": 8}):
        assert key(minilm, EvalSettings(**change)) != base
    assert key(minilm, EvalSettings(batch_size=3, thresholds="0.1:0.2")) == base
    # --no-cache neither reads nor writes
    assert encode_texts(minilm, "m", queries, docs, EvalSettings(cache_dir=cache_dir, show_progress=False,
                                                                 use_cache=False, instruction="Find the topic"),
                        ).info["texts_encoded"] == 5


def test_interrupted_run_resumes_from_the_cache(minilm, cache_dir, monkeypatch):
    calls = []
    real_load = eval_models.load_encoder

    class Failing:  # the real model, failing on its second encode call
        def __init__(self, model):
            self.model, self.query_prompt, self.document_prompt = model, model.query_prompt, model.document_prompt

        def encode(self, texts, **kw):
            calls.append(list(texts))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return self.model.encode(texts, **kw)

    monkeypatch.setattr(eval_models, "CHUNK_TEXTS", 2)
    monkeypatch.setattr(eval_models, "load_encoder", lambda *a, **k: Failing(real_load(*a, **k)))
    settings = EvalSettings(cache_dir=cache_dir, show_progress=False)
    docs = ["one", "two two", "three three three", "four", "five five"]
    with pytest.raises(KeyboardInterrupt):
        encode_texts(minilm, "m", [], docs, settings)
    assert [len(c) for c in calls] == [2, 2]
    monkeypatch.setattr(eval_models, "load_encoder", real_load)
    resumed = encode_texts(minilm, "m", [], docs, settings)
    assert resumed.info["texts_encoded"] == 3  # the first chunk came from the cache
    fresh = encode_texts(minilm, "m", [], docs, EvalSettings(use_cache=False, show_progress=False))
    np.testing.assert_allclose(resumed.documents, fresh.documents, atol=1e-6)


def test_symmetric_prompts_encode_shared_texts_once(tiny_qwen3, cache_dir):
    settings = EvalSettings(cache_dir=cache_dir, show_progress=False, symmetric=True)
    enc = encode_texts(tiny_qwen3, "t", ["a cat", "rain"], ["rain", "snow"], settings)
    assert enc.info["query_prompt"] == enc.info["document_prompt"] != ""
    assert enc.info["texts_encoded"] == 3  # "rain" once
    np.testing.assert_array_equal(enc.queries[1], enc.documents[0])


def test_model_is_freed_before_the_next_one(tiny_qwen3, cache_dir, monkeypatch):
    refs = []
    real_load = eval_models.load_encoder

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(eval_models, "load_encoder", load)
    encode_texts(tiny_qwen3, "t", ["q"], ["d"], EvalSettings(use_cache=False, show_progress=False))
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None


# ------------------------------------------------------------------------------------- inputs
def test_without_dev_threshold_is_best_on_eval_and_split_dev_option(tiny_qwen3, eval_files, cache_dir, tmp_path):
    test, _ = eval_files
    report = evaluate({"tiny": tiny_qwen3}, test, output_dir=tmp_path / "a", cache_dir=cache_dir, n_bootstrap=50,
                      print_table=False, show_progress=False, plots=False)
    res = report["models"]["tiny"]
    assert res["chosen_on"] == "eval" and res["threshold_rule"] == "bagged"
    report = evaluate({"tiny": tiny_qwen3}, test, output_dir=tmp_path / "a", cache_dir=cache_dir, n_bootstrap=50,
                      print_table=False, show_progress=False, plots=False, threshold_rule="best")
    res = report["models"]["tiny"]
    assert res["chosen_on"] == "eval" and res["chosen_threshold"] == res["best_threshold"]
    assert res["f1_at_chosen"] == pytest.approx(res["best_f1"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["results.csv", "results.json", "results.md"]
    report = evaluate({"tiny": tiny_qwen3}, test, split_dev=0.5, output_dir=tmp_path / "b", cache_dir=cache_dir,
                      n_bootstrap=0, print_table=False, show_progress=False, plots=False)
    assert report["data"]["dev"]["queries"] == 2 and report["data"]["eval"]["queries"] == 2
    assert report["models"]["tiny"]["chosen_on"] == "dev" and "f1_at_chosen_ci" not in report["models"]["tiny"]


def test_pair_rows_with_graded_labels(tiny_qwen3, tmp_path, cache_dir):
    data = tmp_path / "qqr.json"  # KUAKE-QQR layout, labels 0/1/2 and one "NA"
    rows = [{"id": str(i), "query1": f"q{i % 3}", "query2": f"text {i}", "label": str(i % 3)} for i in range(12)]
    rows.append({"id": "x", "query1": "q0", "query2": "odd", "label": "NA"})
    data.write_text(json.dumps(rows, ensure_ascii=False))
    with pytest.raises(DataError, match="label"):
        evaluate({"tiny": tiny_qwen3}, data, output_dir=tmp_path / "o", cache_dir=cache_dir, print_table=False)
    report = evaluate({"tiny": tiny_qwen3}, data, output_dir=tmp_path / "o", cache_dir=cache_dir, print_table=False,
                      show_progress=False, plots=False, label_threshold=2, bad_label="skip", n_bootstrap=0)
    stats = report["data"]["eval"]
    assert stats["pairs"] == 12 and stats["positive_pairs"] == 4 and stats["skipped_rows"] == 1
    assert stats["label_values"] == {"0": 4, "1": 4, "2": 4}


def test_bad_inputs_give_clear_errors(tiny_qwen3, eval_files, tmp_path, cache_dir):
    test, _ = eval_files
    kw = dict(output_dir=tmp_path / "o", cache_dir=cache_dir, print_table=False, show_progress=False)
    with pytest.raises(HfembError, match="no relevant pair .*label >= 5"):
        evaluate({"tiny": tiny_qwen3}, test, label_threshold=5, **kw)
    with pytest.raises(ConfigError, match="'abc' is not a number"):
        evaluate({"tiny": tiny_qwen3}, test, thresholds="0.4:abc", **kw)
    with pytest.raises(HfembError, match=r"model 'missing' \(.*nowhere\)"):
        evaluate({"missing": str(tmp_path / "nowhere")}, test, **kw)
    with pytest.raises(HfembError, match="openai:MODEL@BASE_URL"):
        evaluate({"x": "openai:no-url"}, test, **kw)
    with pytest.raises(ConfigError, match="not both"):
        evaluate({"tiny": tiny_qwen3}, test, dev_path=test, split_dev=0.5, **kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "documents": [{"content": "a", "label": 1}]}\n{"query": "q2", "documents": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2.*documents"):
        evaluate({"tiny": tiny_qwen3}, bad, **kw)
    assert not (tmp_path / "o").exists()  # nothing written on error
    # a failing model can be skipped and reported
    report = evaluate({"missing": str(tmp_path / "nowhere"), "tiny": tiny_qwen3}, test, skip_failed=True,
                      plots=False, n_bootstrap=0, **kw)
    assert list(report["models"]) == ["tiny"] and "missing" in report["failed_models"]


# ------------------------------------------------------------------------------------- models
def test_latest_training_output_and_default_models(tmp_path):
    assert latest_training_output(tmp_path) is None
    old, new = tmp_path / "run_a", tmp_path / "run_b"
    for run in (old, new):
        (run / "merged").mkdir(parents=True)
    (tmp_path / "no_merge" / "adapter").mkdir(parents=True)
    os.utime(old / "merged", (time.time() - 100, time.time() - 100))
    os.utime(new / "merged", (time.time() - 200, time.time() - 200))
    assert latest_training_output(tmp_path) == old
    (new / "train_summary.json").write_text(json.dumps({"config": {"model": {"name_or_path": "Qwen/Qwen3-Embedding-8B"}}}))
    os.utime(new / "merged", None)
    models = default_models(tmp_path)
    assert models == {"base 0.6B": "Qwen/Qwen3-Embedding-0.6B", "base 8B": "Qwen/Qwen3-Embedding-8B",
                      "tuned 8B": str(new / "merged")}
    assert eval_models.resolve_model_path(str(new)) == str(new / "merged")
    assert parse_model_args(["tuned=out/x", "Qwen/Qwen3-Embedding-0.6B", "api=openai:m@http://h:1/v1",
                             "openai:m@http://h:2/v1?a=b"]) == {
        "tuned": "out/x", "Qwen/Qwen3-Embedding-0.6B": "Qwen/Qwen3-Embedding-0.6B",
        "api": "openai:m@http://h:1/v1", "openai:m@http://h:2/v1?a=b": "openai:m@http://h:2/v1?a=b"}
    with pytest.raises(ConfigError, match="used twice"):
        parse_model_args(["a=x", "a=y"])


# ---------------------------------------------------------------------------------------- CLI
def test_cli_eval_split_and_config(minilm, tmp_path, cache_dir, capsys):
    data = tmp_path / "all.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pools(0) + _pools(1)))
    assert cli_main(["split", str(data), "--dev-out", str(tmp_path / "dev.json"), "--test-out",
                     str(tmp_path / "test.jsonl"), "--dev-fraction", "0.25", "--seed", "3"]) == 0
    dev_rows = json.loads((tmp_path / "dev.json").read_text())
    test_rows = [json.loads(l) for l in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(dev_rows) == 2 and len(test_rows) == 6
    assert {r["query"] for r in dev_rows}.isdisjoint({r["query"] for r in test_rows})
    assert dev_rows[0]["documents"][0].keys() == {"content", "label"}

    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"models": {"mini": minilm}, "thresholds": "0.2,0.3", "n_bootstrap": 20,
                                  "cache_dir": cache_dir, "plots": False, "show_progress": False}))
    out = tmp_path / "out"
    rc = cli_main(["eval", "--config", str(config), "--data", str(tmp_path / "test.jsonl"), "--dev",
                   str(tmp_path / "dev.json"), "--thresholds", "0.3:0.5", "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| threshold | mini F1 |" in printed and "| 0.5 |" in printed  # CLI thresholds override the config
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["thresholds"] == [0.3, 0.4, 0.5] and saved["settings"]["n_bootstrap"] == 20

    config.write_text(json.dumps({"models": {"mini": minilm}, "treshold": 0.5}))
    assert cli_main(["eval", "--config", str(config), "--data", str(data)]) == 2
    assert "unknown key(s) treshold" in capsys.readouterr().err
    assert cli_main(["eval", "--config", str(config)]) == 2
    assert cli_main(["eval", "--data", str(data), "--model", f"m={minilm}", "--thresholds", "0.7:0.4"]) == 2
    assert "greater than stop" in capsys.readouterr().err


def test_split_refuses_to_overwrite_its_input_and_bad_devices(tmp_path, capsys):
    data = tmp_path / "pools.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}", "documents": [{"content": f"d{i}", "label": 1},
                                                                         {"content": "x", "label": 0}]}) + "\n"
                            for i in range(4)), encoding="utf-8")
    before = data.read_text(encoding="utf-8")
    assert cli_main(["split", str(data), "--dev-out", str(data), "--test-out", str(tmp_path / "t.jsonl")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert data.read_text(encoding="utf-8") == before and not (tmp_path / "t.jsonl").exists()
    import torch

    for device, message in (("foo", "not a device"), (f"cuda:{torch.cuda.device_count()}", "no such CUDA device")):
        with pytest.raises(ConfigError, match=message):
            eval_models._resolved_device_dtype(EvalSettings(device=device))


@pytest.mark.parametrize("config, message", [
    ({"symmetric": "false"}, "'symmetric' must be true or false, got 'false'"),
    ({"thresholds": 0.5}, "'thresholds' must be a string like"),
    ({"label_threshold": "1"}, "'label_threshold' must be a whole number, got '1'"),
    ({"models": {}}, "'models' is empty"),
])
def test_eval_config_values_are_type_checked(tmp_path, capsys, config, message):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert cli_main(["eval", "--config", str(path), "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err
