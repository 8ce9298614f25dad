"""Issue 17: garbage in must not look like success. Eval refuses data without negatives, mining that yields
no row exits 2 with the reason, duplicates are counted, oversized rows are refused by file and line, and
hints name the options a user types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfemb.cli import main
from hfemb.data.containers import DEFAULT_MAX_ROW_BYTES, check_row_sizes
from hfemb.data.formats import count_duplicates, read_records
from hfemb.errors import DataError


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_refuses_data_without_negatives(tiny_qwen3, tmp_path, capsys):
    data = jsonl(tmp_path / "pos_only.jsonl", [{"query": f"q{i}", "pos_doc": [f"answer {i}"]} for i in range(4)])
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(data), "--model", f"tiny={tiny_qwen3}", "--output-dir", str(out),
                 "--no-cache", "--no-plots", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no irrelevant pair (label < 1)" in err and str(data) in err
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("rows, reason", [
    ([{"query": "q", "documents": [{"content": "a", "label": 0}, {"content": "b", "label": 0}]}] * 1
     + [{"query": "r", "documents": [{"content": "c", "label": 0}, {"content": "d", "label": 0}]}],
     "2 of 2 queries have no positive"),
    ([{"query": "only one", "pos_doc": ["the only answer"]}], "1 rows lack 3 negatives among the 1 documents"),
    ([{"query": "same", "pos_doc": ["same answer"]}] * 5, "5 rows lack 3 negatives among the 1 documents"),
])
def test_mining_to_zero_rows_exits_2_with_the_reason(tmp_path, capsys, rows, reason):
    data = jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["mine", "--input", str(data), "--output", str(out), "--tokenizer", "regex", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no row could be mined" in err and reason in err, err
    assert not out.exists()
    assert main(["mine", "--input", str(data), "--output", str(out), "--tokenizer", "regex", "--no-cache",
                 "--allow-empty"]) == 0
    assert out.read_text() == ""


def test_duplicate_rows_are_counted(tmp_path, capsys):
    rows = [{"query": f"q{i}", "pos_doc": [f"answer {i}"]} for i in range(6)]
    data = jsonl(tmp_path / "in.jsonl", rows + [rows[1], rows[1], rows[4]] + [{"query": "q1", "pos_doc": ["other"]}])
    assert count_duplicates(read_records(str(data)).records) == 3  # by hand: rows 1, 1 and 4 repeated
    out = tmp_path / "out.jsonl"
    assert main(["mine", "--input", str(data), "--output", str(out), "--tokenizer", "regex", "--no-cache",
                 "--num-negatives", "2", "--num-hard", "1"]) == 0
    assert "3 exact duplicate rows" in capsys.readouterr().out
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["input"]["duplicate_rows"] == 3
    assert main(["convert", "--input", str(data), "--output", str(tmp_path / "c.jsonl")]) == 0
    assert "duplicates: 3 rows repeat an earlier row exactly" in capsys.readouterr().out


def test_oversized_row_is_refused_by_file_and_line(tmp_path, monkeypatch, capsys):
    big = "长" * (DEFAULT_MAX_ROW_BYTES // 3 + 10)  # 3 bytes a character in UTF-8: just over the limit
    for name, text in [
        ("rows.jsonl", '{"query": "a", "pos_doc": ["b"]}\n\n{"query": "c", "pos_doc": ["' + big + '"]}\n'),
        ("rows.csv", "query,pos_doc\na,b\nc," + big + "\n"),
        ("rows.json", '[\n{"query": "a", "pos_doc": ["b"]},\n{"query": "c", "pos_doc": ["' + big + '"]}\n]'),
    ]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=r":3: row of [\d,]+ bytes exceeds the limit of 1,048,576 bytes "
                                            r"\(set HFEMB_MAX_ROW_BYTES"):
            read_records(str(path))
        assert main(["mine", "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
        assert f"{path}:3: row of" in capsys.readouterr().err
    monkeypatch.setenv("HFEMB_MAX_ROW_BYTES", str(4 * DEFAULT_MAX_ROW_BYTES))
    assert len(read_records(str(tmp_path / "rows.jsonl")).records) == 2
    monkeypatch.setenv("HFEMB_MAX_ROW_BYTES", "lots")
    with pytest.raises(Exception, match="HFEMB_MAX_ROW_BYTES='lots'"):
        read_records(str(tmp_path / "rows.jsonl"))


def test_row_size_check_against_brute_force():
    """The jumping search against splitting into lines, on lines around the limit."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        limit = rng.randint(1, 40)
        lines = [b"x" * rng.randint(0, limit + 2) for _ in range(rng.randint(1, 12))]
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        expected = next((i + 1 for i, line in enumerate(data.split(b"\n")) if len(line) > limit), None)
        try:
            check_row_sizes(data, "f", limit)
            got = None
        except DataError as exc:
            got = exc.line
            size = len(data.split(b"\n")[got - 1])
            assert f"row of {size} bytes" in str(exc)
        assert got == expected, (limit, lines)


def test_unknown_format_hint_names_cli_options(tmp_path):
    data = jsonl(tmp_path / "odd.jsonl", [{"question_text": "q", "answer_text": "a"}])
    with pytest.raises(DataError) as err:
        read_records(str(data))
    message = str(err.value)
    assert "--format" in message and "--query-columns" in message and "--positive-column" in message
    assert "fmt=" not in message and "columns=" not in message
