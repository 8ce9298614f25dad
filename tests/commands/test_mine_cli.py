"""`hfemb mine`: end to end on the embedded sample, pools, shards + merge, bad input, and real WikiQA."""

from __future__ import annotations

import csv
import gzip
import json
from collections import defaultdict

import pytest

from hfemb.cli import build_parser, main
from hfemb.data.formats import read_records


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _report(path):
    return json.loads(open(f"{path}.report.json", encoding="utf-8").read())


def _run(capsys, *argv):
    code = main(["mine", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["mine", "--help"])
    text = capsys.readouterr().out
    parser = build_parser(["mine"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["mine"]
    options = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    assert len(options) > 25
    for option in options:
        assert option in text
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_mine_embedded_sample_corpus_mode(capsys, tmp_path, zh_sample_csv):
    out = tmp_path / "mined.jsonl"
    code, stdout, err = _run(capsys, "--input", zh_sample_csv, "--output", out, "--cache-dir", tmp_path / "c")
    assert code == 0, err
    rows, report = _rows(out), _report(out)
    assert len(rows) == 600 == report["rows_written"] and report["mode"] == "corpus"
    assert report["input"]["format"] == "qa_table" and report["input"]["records"] == 600
    assert report["negatives"] == {"hard": 600, "easy": 1200, "random": 0}
    assert "600 queries -> 600 rows" in stdout and "excluded from negatives: own_positive 600" in stdout
    assert all(len(r["negative"]) == 3 and r["mining"]["kinds"] == ["hard", "easy", "easy"] for r in rows)
    back = read_records(out)  # the output is hfemb format 1, readable by the data layer
    assert back.format == "hfemb" and len(back.records) == 600
    assert back.records[0].negatives == rows[0]["negative"] and back.records[0].extra["mining"] == rows[0]["mining"]
    code, stdout, _ = _run(capsys, "--input", zh_sample_csv, "--output", tmp_path / "again.jsonl",
                           "--cache-dir", tmp_path / "c")
    assert code == 0 and _rows(tmp_path / "again.jsonl") == rows and "2 cache hits, 0 misses" in stdout


def test_shards_and_merge(capsys, tmp_path, zh_sample_csv):
    common = ["--input", zh_sample_csv, "--tokenizer", "char", "--no-cache", "--num-negatives", "4",
              "--num-hard", "2", "--skip-top", "1"]
    assert _run(capsys, *common, "--output", tmp_path / "full.jsonl")[0] == 0
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.jsonl")
        assert _run(capsys, *common, "--num-shards", 3, "--shard-index", i, "--output", shards[-1])[0] == 0
    assert [_report(s)["shard"]["query_start"] for s in shards] == [0, 200, 400]
    code, stdout, _ = _run(capsys, "--merge", shards[2], shards[0], shards[1], "--output", tmp_path / "m.jsonl")
    assert code == 0 and "600 rows" in stdout
    assert _rows(tmp_path / "m.jsonl") == _rows(tmp_path / "full.jsonl")
    code, _, err = _run(capsys, "--merge", shards[0], shards[1], "--output", tmp_path / "bad.jsonl")
    assert code == 2 and "expected each of 0..2" in err and not (tmp_path / "bad.jsonl").exists()
    # a shard re-run with other workers / cache settings (they do not change the rows) still merges (issue 13)
    assert _run(capsys, *[a for a in common if a != "--no-cache"], "--cache-dir", tmp_path / "c", "--workers", 1,
                "--num-shards", 3, "--shard-index", 1, "--output", shards[1])[0] == 0
    assert _run(capsys, "--merge", *shards, "--output", tmp_path / "m2.jsonl")[0] == 0
    assert _rows(tmp_path / "m2.jsonl") == _rows(tmp_path / "full.jsonl")
    assert _run(capsys, *common, "--num-hard", 1, "--num-shards", 3, "--shard-index", 1, "--output", shards[1])[0] == 0
    code, _, err = _run(capsys, "--merge", *shards, "--output", tmp_path / "m3.jsonl")
    assert code == 2 and "different settings" in err and "num_hard" in err


def test_pool_mode_is_default_for_labelled_pools(capsys, tmp_path):
    data = tmp_path / "pools.jsonl"
    pools = [{"query": f"what is {w}", "documents": [{"content": f"{w} is a thing", "label": 1}] +
              [{"content": f"{w} {x} text {i}", "label": 0} for i, x in enumerate(["alpha", "beta", "gamma", "delta"])]}
             for w in ("bm25", "jieba", "lora")]
    pools.append({"query": "small", "documents": [{"content": "yes", "label": 1}, {"content": "no", "label": 0}]})
    data.write_text("".join(json.dumps(p) + "\n" for p in pools), encoding="utf-8")
    code, stdout, err = _run(capsys, "--input", data, "--output", tmp_path / "o.jsonl", "--tokenizer", "regex",
                             "--no-cache", "--hard-top-k", "2", "--easy-bottom-k", "2")
    assert code == 0, err
    report, rows = _report(tmp_path / "o.jsonl"), _rows(tmp_path / "o.jsonl")
    assert report["mode"] == "pool" and report["rows_dropped"]["too_few_negatives"] == 1 and len(rows) == 3
    for pool, row in zip(pools, rows):
        assert set(row["negative"]) <= {d["content"] for d in pool["documents"][1:]}
    code, _, err = _run(capsys, "--input", data, "--output", tmp_path / "x.jsonl", "--corpus", data)
    assert code == 2 and "--corpus is for corpus mode" in err


def test_query_and_positive_columns_and_corpus_file(capsys, tmp_path):
    table = tmp_path / "qa.csv"
    with open(table, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["q1", "q2", "ans"])
        for i in range(6):
            w.writerow([f"question {i}", f"detail {i}", f"answer number {i}"])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"document about number {i}" for i in range(8)) + "\n", encoding="utf-8")
    code, _, err = _run(capsys, "--input", table, "--output", tmp_path / "o.jsonl", "--query-columns", "q1,q2",
                        "--positive-column", "ans", "--corpus", corpus, "--tokenizer", "regex", "--no-cache")
    assert code == 0, err
    rows = _rows(tmp_path / "o.jsonl")
    assert rows[0]["query"] == "question 0\ndetail 0" and rows[0]["positive"] == "answer number 0"
    assert all(n.startswith("document about") for r in rows for n in r["negative"])
    assert _report(tmp_path / "o.jsonl")["documents"] == 8


def test_bad_input_is_one_line_error_and_leaves_output_alone(capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "a", "pos": ["b"]}\n{"query": "c", "pos": "d"}\n{"query": "", "pos": ["f"]}\n'
                    '{"query": "g", "pos": ["h"]}\n{"query": "i", "pos": ["j"]}\n{"query": "k", "pos": ["l"]}\n',
                    encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    code, _, err = _run(capsys, "--input", data, "--output", out, "--tokenizer", "char", "--no-cache")
    assert code == 2 and err.count("\n") == 1 and f"{data}:3" in err and "query" in err
    assert out.read_text(encoding="utf-8") == "previous\n" and not (tmp_path / "out.jsonl.report.json").exists()
    code, stdout, err = _run(capsys, "--input", data, "--output", out, "--tokenizer", "char", "--no-cache",
                             "--skip-bad", "--num-negatives", "2", "--num-hard", "1")
    assert code == 0, err
    assert _report(out)["input"]["skipped"] == 1 and "1 bad rows skipped" in stdout and len(_rows(out)) == 5
    for argv, message in [(["--num-hard", "4"], "num_hard (4) exceeds num_negatives (3)"),
                          (["--shard-index", "1"], "shard_index must be in [0, num_shards)"),
                          (["--merge", out], "--merge and --input exclude each other"),
                          (["--query-columns", "a"], "go together")]:
        code, _, err = _run(capsys, "--input", data, "--output", tmp_path / "x.jsonl", *argv)
        assert code == 2 and message in err, err
    code, _, err = _run(capsys, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "x.jsonl")
    assert code == 2 and "missing.jsonl" in err
    code, _, err = _run(capsys, "--input", data, "--output", data)
    assert code == 2 and "is the input" in err
    assert not (tmp_path / "x.jsonl").exists()


def test_real_wikiqa_dev_pools(capsys, tmp_path, shared_data):
    path = shared_data / "wikiqa" / "WikiQA-dev.tsv.gz"
    code, _, err = _run(capsys, "--input", path, "--output", tmp_path / "w.jsonl", "--tokenizer", "regex",
                        "--no-cache", "--hard-top-k", "3", "--easy-bottom-k", "3")
    assert code == 0, err
    pools = defaultdict(lambda: [0, set()])  # question -> [positives, distinct negative sentences]
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["Label"] == "1":
                pools[row["QuestionID"]][0] += 1
            else:
                pools[row["QuestionID"]][1].add(row["Sentence"].strip())
    expected = sum(p for p, negs in pools.values() if p and len(negs) >= 3)
    report, rows = _report(tmp_path / "w.jsonl"), _rows(tmp_path / "w.jsonl")
    assert report["mode"] == "pool" and len(rows) == report["rows_written"] == expected > 100
    assert report["queries_without_positive"] == sum(1 for p, _ in pools.values() if not p)


def test_idf_scope_pool_reproduces_one_bm25okapi_per_query(capsys, tmp_path):
    """`--idf-scope pool`: every recorded BM25 score (negatives and positive) is rank-bm25's BM25Okapi built on
    that query's own pool; the default (all pools' statistics) gives other scores."""
    from rank_bm25 import BM25Okapi

    from hfemb.mining.bm25 import tokenize

    words = ["blood", "pressure", "salt", "heart", "sleep", "water", "diet", "pain", "liver", "sugar"]
    pools = []
    for i in range(5):
        docs = [{"content": f"{words[i]} {words[i + 1]} advice for {words[i]}", "label": 1}]
        docs += [{"content": " ".join(words[(i + k + j) % 10] for j in range(1 + k % 3)) + f" note {k}", "label": 0}
                 for k in range(6)]
        pools.append({"query": f"what about {words[i]} and {words[(i + 3) % 10]}", "documents": docs})
    data = tmp_path / "pools.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pools), encoding="utf-8")
    common = ["--input", data, "--tokenizer", "regex", "--no-cache", "--num-negatives", "3", "--num-hard", "1",
              "--hard-top-k", "2", "--easy-bottom-k", "2"]
    assert _run(capsys, *common, "--idf-scope", "pool", "--output", tmp_path / "pool.jsonl")[0] == 0
    assert _run(capsys, *common, "--output", tmp_path / "all.jsonl")[0] == 0
    rows, rows_all = _rows(tmp_path / "pool.jsonl"), _rows(tmp_path / "all.jsonl")
    assert len(rows) == 5 and _report(tmp_path / "pool.jsonl")["config"]["idf_scope"] == "pool"
    differs = False
    for pool, row, row_all in zip(pools, rows, rows_all):
        texts = [d["content"] for d in pool["documents"]]
        okapi = BM25Okapi(tokenize(texts, "regex", use_cache=False))
        expected = dict(zip(texts, okapi.get_scores(tokenize([pool["query"]], "regex", use_cache=False)[0])))
        assert row["mining"]["positive_bm25"] == pytest.approx(expected[row["positive"]], abs=1e-9)
        assert row["mining"]["bm25"] == pytest.approx([expected[t] for t in row["negative"]], abs=1e-9)
        differs |= row_all["mining"]["positive_bm25"] != pytest.approx(expected[row["positive"]], abs=1e-6)
    assert differs
    code, _, err = _run(capsys, *common, "--mode", "corpus", "--idf-scope", "pool", "--output", tmp_path / "x.jsonl")
    assert code == 2 and "needs pool mode" in err
