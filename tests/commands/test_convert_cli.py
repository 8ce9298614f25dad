"""`hfemb convert`: counts printed, formats written, exit 2 with one line on bad data, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hfemb.cli import main
from hfemb.data.formats import read_records

DATA = Path(__file__).parents[1] / "fixtures"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "hfemb", "convert", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ("--input", "--output", "--from", "--to", "--query-columns", "--positive-column", "--query-sep",
                   "--label-threshold", "--skip-bad", "--bad-label", "--extra"):
        assert option in proc.stdout


def test_flagembedding_to_swift(tmp_path, capsys):
    out = tmp_path / "swift.jsonl"
    assert main(["convert", "--input", str(DATA / "flagembedding.json"), "--output", str(out), "--to", "swift"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"read {DATA / 'flagembedding.json'}: 3 rows, format flagembedding", "records: 3",
                       "skipped: 0 bad rows", f"wrote {out}: 4 rows (swift)"]
    assert rows(out) == [
        {"query": "how are glacier caves formed?",
         "response": "A glacier cave is a cave formed within the ice of a glacier.",
         "rejected_response": ["Ice formations in the Titlis glacier cave.", "The ice facade is 60 m high."]},
        {"query": "what is a tissue?", "response": "Tissue is a cellular organizational level.",
         "rejected_response": []},
        {"query": "多个正例", "response": "正例一", "rejected_response": ["负例"]},
        {"query": "多个正例", "response": "正例二", "rejected_response": ["负例"]},
    ]


def test_extra_none_and_from(tmp_path, capsys):
    out = tmp_path / "flag.jsonl"
    args = ["convert", "--input", str(DATA / "hfemb_mined.jsonl"), "--output", str(out), "--from", "hfemb",
            "--to", "flagembedding", "--extra", "none"]
    assert main(args) == 0
    assert rows(out)[0] == {"query": "高血压能吃党参吗", "pos": ["可以适量服用党参。"], "neg": ["胃胀多吃软食。", "感冒多喝水。"]}
    assert all(set(r) == {"query", "pos", "neg"} for r in rows(out))
    assert main(args[:-1] + ["all"]) == 0
    assert rows(out)[0]["mining"] == {"method": "bm25", "hard": 1, "easy": 1} and rows(out)[1]["id"] == 7


def test_qa_table_columns(tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    args = ["convert", "--input", str(DATA / "custom_qa.tsv"), "--output", str(out), "--query-columns",
            "question, context", "--positive-column", "answer", "--query-sep", "\\t"]
    assert main(args) == 0
    assert [(r["query"], r["positive"]) for r in rows(out)] == [
        ("What is BM25?\tranking", "A ranking function."), ("What is jieba?", "A Chinese word segmenter.")]
    assert main(["convert", "--input", str(DATA / "custom_qa.tsv"), "--output", str(out),
                 "--query-columns", "question"]) == 2
    assert "--query-columns and --positive-column go together" in capsys.readouterr().err


def test_skip_bad_counts_by_reason(tmp_path, capsys):
    out = tmp_path / "kuake.jsonl"
    args = ["convert", "--input", str(DATA / "kuake_mini.json"), "--output", str(out), "--skip-bad",
            "--label-threshold", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"read {DATA / 'kuake_mini.json'}: 4 rows, format pairs",
        "records: 1",
        "skipped: 1 bad rows",
        f"  bad label: 1 (first: {DATA / 'kuake_mini.json'}:14, field 'label': bad label: expected an integer "
        "label, got 'NA')",
        f"wrote {out}: 1 rows (hfemb)",
    ]
    assert rows(out) == [{"query": "茴香是发物吗", "positive": "茴香是发物吗？", "negative": ["茴香怎么吃？", "茴香算发物吗"]}]


def test_bad_label_skip_option(tmp_path, capsys):
    out = tmp_path / "kuake.jsonl"
    assert main(["convert", "--input", str(DATA / "kuake_mini.json"), "--output", str(out),
                 "--bad-label", "skip"]) == 0
    assert "  bad label: 1" in capsys.readouterr().out
    assert rows(out)[0]["negative"] == ["茴香怎么吃？"]  # threshold 1: labels 1 and 2 are positives
    assert len(rows(out)) == 2


def test_data_error_exit_2_one_line_and_no_output(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["convert", "--input", str(DATA / "bad_json.jsonl"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"hfemb convert: error: {DATA / 'bad_json.jsonl'}:3: invalid JSON")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_keeps_existing_output(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("previous content\n", encoding="utf-8")
    for bad in ("bad_types.json", "bad_syntax.json", "not_utf8.csv"):
        assert main(["convert", "--input", str(DATA / bad), "--output", str(out)]) == 2
    # nothing to write: no record has a positive
    assert main(["convert", "--input", str(DATA / "lcqmc_mini.tsv"), "--output", str(out),
                 "--label-threshold", "5"]) == 2
    assert "no record has a positive" in capsys.readouterr().err
    assert out.read_text("utf-8") == "previous content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_converted_output_reads_back(tmp_path, capsys):
    out = tmp_path / "pool.json.gz"
    assert main(["convert", "--input", str(DATA / "pool_private.json"), "--output", str(out),
                 "--to", "flagembedding"]) == 0
    (record,) = read_records(out).records
    assert (record.query, record.positives, record.negatives) == (
        "保险理赔流程", ["提交理赔申请表。", "理赔时效说明。"], ["公司年会通知。"])
    assert record.extra == {}  # FlagEmbedding rows carry only the keys FlagEmbedding reads
    assert main(["convert", "--input", str(DATA / "pool_private.json"), "--output", str(out), "--to", "hfemb"]) == 0
    assert read_records(out).records[0].extra == {"qid": "p1", "content_public": ["保险法第二十二条。"]}


@pytest.mark.parametrize("fixture", ["medical_qa.csv", "qa_blocks.txt", "lcqmc_mini.tsv", "wikiqa_mini.tsv.gz",
                                     "pos_doc.jsonl", "swift_messages.jsonl", "pairs_header.csv"])
def test_every_readable_fixture_converts(tmp_path, capsys, fixture):
    out = tmp_path / "out.jsonl"
    assert main(["convert", "--input", str(DATA / fixture), "--output", str(out)]) == 0
    expected = sum(len(r.positives) for r in read_records(DATA / fixture).records)
    assert len(rows(out)) == expected > 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out}: {expected} rows (hfemb)"
