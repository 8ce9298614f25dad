"""hfemb.data.formats: every format read into exact Records, detection, containers, errors, writers, real files."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import shutil
from pathlib import Path

import pytest

from hfemb.data.formats import FORMATS, read_corpus, read_records, record_to_row, write_records
from hfemb.data.records import ColumnMap, Record
from hfemb.errors import ConfigError, DataError

DATA = Path(__file__).parents[1] / "fixtures"


def src(name: str, line: int) -> str:
    return f"{DATA / name}:{line}"


def core(records):
    """What a record means for training, without where it came from."""
    return [(r.query, r.positives, r.negatives, r.candidates, r.extra) for r in records]


# --------------------------------------------------------------------------- each format, exact records

def test_hfemb_format():
    result = read_records(DATA / "hfemb_mined.jsonl")
    assert result.format == "hfemb" and result.rows == 3 and result.skipped == []
    assert result.records == [
        Record("高血压能吃党参吗", ["可以适量服用党参。"], ["胃胀多吃软食。", "感冒多喝水。"],
               source=src("hfemb_mined.jsonl", 1), extra={"mining": {"method": "bm25", "hard": 1, "easy": 1}}),
        Record("What is BM25?", ["A ranking function.", "Okapi BM25 scores documents."], [],
               source=src("hfemb_mined.jsonl", 3), extra={"id": 7}),
        Record("padded query", ["padded doc"], [], source=src("hfemb_mined.jsonl", 4)),
    ]


def test_flagembedding_json_array_lines():
    result = read_records(DATA / "flagembedding.json")
    assert result.format == "flagembedding"
    assert result.records == [
        Record("how are glacier caves formed?", ["A glacier cave is a cave formed within the ice of a glacier."],
               ["Ice formations in the Titlis glacier cave.", "The ice facade is 60 m high."],
               source=src("flagembedding.json", 2)),
        Record("what is a tissue?", ["Tissue is a cellular organizational level."], [],
               source=src("flagembedding.json", 7), extra={"prompt": "Represent this question"}),
        Record("多个正例", ["正例一", "正例二"], ["负例"], source=src("flagembedding.json", 8)),
    ]


def test_swift_formats():
    assert read_records(DATA / "swift_infonce.jsonl").records == [
        Record("sentence1", ["sentence1-positive"], ["sentence1-negative1", "sentence1-negative2"],
               source=src("swift_infonce.jsonl", 1)),
        Record("sentence2", ["sentence2-positive"], [], source=src("swift_infonce.jsonl", 2)),
    ]
    result = read_records(DATA / "swift_messages.jsonl")
    assert result.format == "swift_messages"
    assert result.records == [Record("sentence1", ["sentence2"], ["sentence3", "sentence4"],
                                     source=src("swift_messages.jsonl", 1))]


def test_pos_doc_format():
    result = read_records(DATA / "pos_doc.jsonl")
    assert result.format == "pos_doc"
    assert result.records == [
        Record("头痛怎么办", ["注意休息，必要时就医。"], source=src("pos_doc.jsonl", 1)),
        Record("咳嗽吃什么药", ["止咳糖浆。", "先查明病因。"], source=src("pos_doc.jsonl", 2), extra={"id": "c2"}),
    ]


def test_pool_documents_with_threshold():
    result = read_records(DATA / "pool_documents.jsonl")
    assert result.format == "pool"
    pool = [("少盐清淡。", 1), ("多吃咸菜。", 0), ("每天不超过六克盐。", 2), ("无关内容。", 0)]
    assert result.records == [
        Record("高血压饮食", ["少盐清淡。", "每天不超过六克盐。"], ["多吃咸菜。", "无关内容。"], pool,
               source=src("pool_documents.jsonl", 1)),
        Record("无正例的问题", [], ["甲。"], [("甲。", 0)], source=src("pool_documents.jsonl", 2)),
    ]
    graded = read_records(DATA / "pool_documents.jsonl", label_threshold=2).records[0]
    assert graded.positives == ["每天不超过六克盐。"]
    assert graded.negatives == ["少盐清淡。", "多吃咸菜。", "无关内容。"]
    assert graded.candidates == pool


def test_pool_private_public():
    (record,) = read_records(DATA / "pool_private.json").records
    assert record == Record(
        "保险理赔流程", ["提交理赔申请表。", "理赔时效说明。"], ["公司年会通知。"],
        [("提交理赔申请表。", 1), ("公司年会通知。", 0), ("理赔时效说明。", 1)],
        source=src("pool_private.json", 2), extra={"qid": "p1", "content_public": ["保险法第二十二条。"]})


def test_medical_qa_csv_header_detected():
    result = read_records(DATA / "medical_qa.csv")
    assert result.format == "qa_table"
    assert result.records == [
        Record("高血压能吃党参吗？\n我有高血压，能喝党参水吗？", ["可以适量服用。"], source=src("medical_qa.csv", 2),
               extra={"department": "心血管科"}),
        # empty title is skipped; the quoted answer spans two physical lines
        Record("吃点东西就胃胀，\n两个月了", ["清淡饮食，必要时做胃镜。"], source=src("medical_qa.csv", 3),
               extra={"department": "消化科"}),
    ]


def test_column_map_tsv_and_jsonl(tmp_path):
    columns = ColumnMap(query=["question", "context"], positive="answer", sep=" | ")
    result = read_records(DATA / "custom_qa.tsv", columns=columns)
    assert result.format == "qa_table"
    assert core(result.records) == [
        ("What is BM25? | ranking", ["A ranking function."], [], [], {"id": "1"}),
        ("What is jieba?", ["A Chinese word segmenter."], [], [], {"id": "2"}),
    ]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"q": "问", "a": "答", "k": 1}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert core(read_records(jsonl, columns=ColumnMap(["q"], "a")).records) == [("问", ["答"], [], [], {"k": 1})]


def test_qa_blocks_auto_and_explicit():
    expected = [Record("高血压患者能吃党参吗？,我有高血压", ["可以适量服用。"], source=src("qa_blocks.txt", 1)),
                Record("胃胀怎么办？,吃点东西就胃胀", ["清淡饮食。"], source=src("qa_blocks.txt", 5))]
    assert read_records(DATA / "qa_blocks.txt").records == expected
    result = read_records(DATA / "qa_blocks.txt", fmt="qa_blocks")
    assert result.format == "qa_blocks" and result.records == expected


def test_lcqmc_headerless_tsv_grouped_and_bom():
    result = read_records(DATA / "lcqmc_mini.tsv")  # file-level BOM and a field BOM
    assert result.format == "pairs" and result.rows == 3
    assert result.records == [
        Record("开初婚未育证明怎么弄？", ["初婚未育情况证明怎么开？"], ["怎么开未婚证明"],
               [("初婚未育情况证明怎么开？", 1), ("怎么开未婚证明", 0)], source=src("lcqmc_mini.tsv", 1)),
        Record("谁有狂三这张高清的", [], ["这张高清图，谁有"], [("这张高清图，谁有", 0)], source=src("lcqmc_mini.tsv", 2)),
    ]


def test_kuake_pairs_na_label_and_threshold():
    with pytest.raises(DataError) as info:
        read_records(DATA / "kuake_mini.json")
    assert str(info.value) == (f"{DATA / 'kuake_mini.json'}:14, field 'label': bad label: "
                               "expected an integer label, got 'NA'")
    assert (info.value.line, info.value.field) == (14, "label")
    for kwargs in ({"on_error": "skip"}, {"bad_label": "skip"}):
        result = read_records(DATA / "kuake_mini.json", label_threshold=2, **kwargs)
        assert [(e.kind, e.line) for e in result.skipped] == [("bad label", 14)]
        assert result.records == [Record(
            "茴香是发物吗", ["茴香是发物吗？"], ["茴香怎么吃？", "茴香算发物吗"],
            [("茴香怎么吃？", 0), ("茴香是发物吗？", 2), ("茴香算发物吗", 1)], source=src("kuake_mini.json", 2))]
    default = read_records(DATA / "kuake_mini.json", bad_label="skip").records[0]
    assert default.positives == ["茴香是发物吗？", "茴香算发物吗"]


def test_pairs_with_header_csv():
    assert core(read_records(DATA / "pairs_header.csv").records) == [
        ("A man plays guitar.", ["Someone plays an instrument."], ["A cat sleeps."],
         [("Someone plays an instrument.", 1), ("A cat sleeps.", 0)], {})]


def test_wikiqa_gz_grouped_by_question():
    result = read_records(DATA / "wikiqa_mini.tsv.gz")
    assert result.format == "wikiqa"
    assert result.records == [
        Record("how are glacier caves formed?", ["A glacier cave is a cave formed within the ice of a glacier ."],
               ['A partly submerged glacier cave on "Perito Moreno" Glacier .'],
               [('A partly submerged glacier cave on "Perito Moreno" Glacier .', 0),
                ("A glacier cave is a cave formed within the ice of a glacier .", 1)],
               source=src("wikiqa_mini.tsv.gz", 2), extra={"question_id": "Q1"}),
        Record("How much is 1 tablespoon of water", [], ["This tablespoon has a scale ."],
               [("This tablespoon has a scale .", 0)], source=src("wikiqa_mini.tsv.gz", 4),
               extra={"question_id": "Q2"}),
    ]


def test_gz_json_array_and_jsonl_equal(tmp_path):
    rows = [json.loads(line) for line in (DATA / "hfemb_mined.jsonl").read_text("utf-8").splitlines() if line]
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    packed = tmp_path / "rows.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write((DATA / "hfemb_mined.jsonl").read_text("utf-8"))
    expected = core(read_records(DATA / "hfemb_mined.jsonl").records)
    assert core(read_records(array).records) == expected
    assert core(read_records(packed).records) == expected
    assert [r.source for r in read_records(packed).records] == [f"{packed}:1", f"{packed}:3", f"{packed}:4"]


def test_explicit_format_overrides_detection(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"query": "q", "pos": ["p"], "response": "r"}\n', encoding="utf-8")
    assert read_records(path).records[0].positives == ["p"]  # flagembedding wins over swift
    assert read_records(path, fmt="swift").records[0].positives == ["r"]
    assert read_records(path, fmt="swift").records[0].extra == {"pos": ["p"]}


# --------------------------------------------------------------------------- bad input

def write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_records(path, **kwargs)
    return info.value


def test_invalid_json_line_and_skip():
    err = error_of(DATA / "bad_json.jsonl")
    assert (err.path, err.line, err.field) == (str(DATA / "bad_json.jsonl"), 3, None)
    assert str(err).startswith(f"{DATA / 'bad_json.jsonl'}:3: invalid JSON: Expecting ',' delimiter")
    result = read_records(DATA / "bad_json.jsonl", on_error="skip")
    assert [r.query for r in result.records] == ["a", "c", "g"]
    assert result.records[2].negatives == ["x"]
    assert [(e.kind, e.line) for e in result.skipped] == [("invalid JSON", 3)]


def test_json_array_wrong_type_names_element_line_and_field():
    err = error_of(DATA / "bad_types.json")
    assert str(err) == f"{DATA / 'bad_types.json'}:3, field 'neg[0]': wrong type: expected a string, got int"
    result = read_records(DATA / "bad_types.json", on_error="skip")
    assert [r.query for r in result.records] == ["a"] and result.skipped[0].line == 3


def test_json_array_syntax_error_is_fatal_even_when_skipping():
    for on_error in ("raise", "skip"):
        err = error_of(DATA / "bad_syntax.json", on_error=on_error)
        assert err.line == 3 and "invalid JSON: Expecting ',' delimiter" in str(err)


@pytest.mark.parametrize("row, field, message", [
    ({"query": "q", "pos": "p", "neg": "n", "x": 1}, None, None),  # valid control row
    ({"pos": ["p"]}, None, "keys ['pos'] match no known format"),
    ({"query": "  ", "pos": ["p"]}, "query", "empty field"),
    ({"query": "q", "pos": []}, "pos", "empty field: empty list"),
    ({"query": "q", "pos": ["p", " "]}, "pos[1]", "empty field"),
    ({"query": "q", "pos": ["p"], "neg": {"a": 1}}, "neg", "wrong type: expected a list of strings, got dict"),
    ({"query": 3, "pos": ["p"]}, "query", "wrong type: expected a string, got int"),
    ({"query": "q", "pos": None}, "pos", "missing field"),
])
def test_bad_row_messages(tmp_path, row, field, message):
    path = write(tmp_path, "rows.jsonl", '{"query": "first", "pos": "ok"}\n' + json.dumps(row) + "\n")
    if message is None:
        assert len(read_records(path).records) == 2
        return
    if "known format" in message:  # detection happens on the first row only
        path = write(tmp_path, "rows.jsonl", json.dumps(row) + "\n" + '{"query": "q", "pos": "ok"}\n')
        err = error_of(path)
        assert err.line == 1 and err.field is None and message in str(err)
        result = read_records(path, on_error="skip")
        assert result.format == "flagembedding" and len(result.records) == 1
        assert result.skipped[0].kind == "unknown format"
        return
    err = error_of(path)
    assert (err.line, err.field) == (2, field)
    assert str(err) == f"{path}:2, field '{field}': {message}"


@pytest.mark.parametrize("item, field, message", [
    ({"content": "d"}, "documents[1].label", "missing field"),
    ({"content": "d", "label": "yes"}, "documents[1].label", "bad label: expected an integer label, got 'yes'"),
    ({"content": "d", "label": 0.5}, "documents[1].label", "bad label: expected an integer label, got 0.5"),
    ({"content": "", "label": 1}, "documents[1].content", "empty field"),
    ("plain text", "documents[1]", "wrong type: expected an object {content, label}"),
])
def test_bad_pool_items(tmp_path, item, field, message):
    row = {"query": "q", "documents": [{"content": "ok", "label": True}, item]}
    path = write(tmp_path, "pool.jsonl", json.dumps(row) + "\n")
    assert str(error_of(path)) == f"{path}:1, field '{field}': {message}"


def test_labels_int_bool_string_float(tmp_path):
    row = {"query": "q", "documents": [{"content": "a", "label": True}, {"content": "b", "label": " 2 "},
                                       {"content": "c", "label": 1.0}, {"content": "d", "label": False},
                                       {"content": "e", "label": "1.0"}, {"content": "f", "label": -1}]}
    path = write(tmp_path, "pool.jsonl", json.dumps(row) + "\n")
    assert read_records(path).records[0].candidates == [("a", 1), ("b", 2), ("c", 1), ("d", 0), ("e", 1), ("f", -1)]
    for bad in ("NA", "1.5", "nan", "", None, [1]):
        row = {"query": "q", "documents": [{"content": "a", "label": bad}]}
        path = write(tmp_path, "pool.jsonl", json.dumps(row) + "\n")
        assert str(error_of(path)) == (f"{path}:1, field 'documents[0].label': bad label: "
                                       f"expected an integer label, got {bad!r}")


def test_not_an_object_empty_file_and_all_bad(tmp_path):
    err = error_of(write(tmp_path, "list.jsonl", '{"query": "q", "pos": "p"}\n["q", "p"]\n'))
    assert err.line == 2 and "not an object: expected a JSON object, got list" in str(err)
    for text in ("", "\n  \n", "[]", "[\n]\n"):
        path = write(tmp_path, "empty.json", text)
        assert str(error_of(path)) == f"{path}: no rows (empty file)"
    path = write(tmp_path, "bad.jsonl", "nope\n{\n")
    err = error_of(path, on_error="skip")
    assert str(err).startswith(f"{path}: no valid rows: all 2 rows are bad; first: {path}:1: invalid JSON")


def test_not_utf8_and_missing_file(tmp_path):
    err = error_of(DATA / "not_utf8.csv")
    assert err.line == 2 and str(err).startswith(f"{DATA / 'not_utf8.csv'}:2: not valid UTF-8")
    assert str(error_of(tmp_path / "missing.jsonl")) == f"{tmp_path / 'missing.jsonl'}: no such file"
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    assert "cannot read file" in str(error_of(broken))
    assert "cannot read file" in str(error_of(tmp_path))  # a directory


def test_table_errors(tmp_path):
    path = write(tmp_path, "rows.csv", "query,pos\nq1,p1\nq2,p2,extra\n")
    err = error_of(path)
    assert str(err) == f"{path}:3: wrong column count: expected 2 columns, got 3"
    path = write(tmp_path, "noheader.csv", "a,b\n")
    assert "no header row" in str(error_of(path)) and error_of(path).line == 1
    path = write(tmp_path, "qa.csv", "department,title,ask,answer\n内科,标题,问题,\n")
    assert str(error_of(path)) == f"{path}:2, field 'answer': empty field"
    path = write(tmp_path, "qa.csv", "department,title,ask,answer\n内科,, ,答\n")
    assert str(error_of(path)) == f"{path}:2, field 'title+ask': empty field"


def test_bad_blocks_skip():
    err = error_of(DATA / "bad_blocks.txt")
    assert str(err) == f"{DATA / 'bad_blocks.txt'}:4: bad block: expected 2 lines (question, answer), got 1"
    result = read_records(DATA / "bad_blocks.txt", on_error="skip")
    assert [r.query for r in result.records] == ["高血压？", "胃胀？"] and result.skipped[0].line == 4


def test_config_errors():
    with pytest.raises(ConfigError):
        read_records(DATA / "pos_doc.jsonl", fmt="nope")
    with pytest.raises(ConfigError):
        read_records(DATA / "pos_doc.jsonl", on_error="ignore")
    with pytest.raises(ConfigError):
        read_records(DATA / "pos_doc.jsonl", fmt="swift", columns=ColumnMap(["a"], "b"))


# --------------------------------------------------------------------------- corpus

def test_read_corpus(tmp_path):
    assert read_corpus(DATA / "corpus.jsonl") == ["第一篇文档。", "第二篇"]
    assert read_corpus(DATA / "corpus.txt") == ["第一行文档", "第二行文档"]
    array = write(tmp_path, "c.json", '["a", {"text": "b"}]')
    assert read_corpus(array) == ["a", "b"]
    bad = write(tmp_path, "c.jsonl", '{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2, field 'text': missing field"):
        read_corpus(bad)


# --------------------------------------------------------------------------- writers and round trips

RECORDS = [
    Record("q1", ["p1", "p2"], ["n1", "n2"], extra={"mining": {"method": "bm25"}, "prompt": "Represent"}),
    Record("问题二", ["答案"], []),
    Record("q3", ["p3"], ["n3"], extra={"id": 3}),
]
KEPT_EXTRA = {  # what extra="auto" writes: hfemb all, flagembedding the keys FlagEmbedding reads, swift none
    "hfemb": lambda extra: extra,
    "flagembedding": lambda extra: {k: v for k, v in extra.items() if k == "prompt"},
    "swift": lambda extra: {},
}


def split(records, keep=lambda extra: extra):
    """One record per positive: what the one-row-per-positive formats give back."""
    return [(r.query, [p], r.negatives, [], keep(r.extra)) for r in records for p in r.positives]


def test_record_to_row():
    assert record_to_row(RECORDS[0]) == [
        {"query": "q1", "positive": "p1", "negative": ["n1", "n2"], "mining": {"method": "bm25"}, "prompt": "Represent"},
        {"query": "q1", "positive": "p2", "negative": ["n1", "n2"], "mining": {"method": "bm25"}, "prompt": "Represent"}]
    assert record_to_row(RECORDS[0], "flagembedding") == {
        "query": "q1", "pos": ["p1", "p2"], "neg": ["n1", "n2"], "prompt": "Represent"}
    assert record_to_row(RECORDS[0], "flagembedding", extra="none") == {
        "query": "q1", "pos": ["p1", "p2"], "neg": ["n1", "n2"]}
    assert record_to_row(RECORDS[0], "swift") == [
        {"query": "q1", "response": "p1", "rejected_response": ["n1", "n2"]},
        {"query": "q1", "response": "p2", "rejected_response": ["n1", "n2"]}]
    assert record_to_row(RECORDS[2], "swift", extra="all") == [
        {"query": "q3", "response": "p3", "rejected_response": ["n3"], "id": 3}]
    assert record_to_row(RECORDS[1], "swift") == [{"query": "问题二", "response": "答案", "rejected_response": []}]
    clash = Record("q", ["p"], extra={"pos": "ignored", "k": 1})  # extra never overrides the format's keys
    assert record_to_row(clash, "flagembedding", extra="all") == {"query": "q", "pos": ["p"], "neg": [], "k": 1}
    with pytest.raises(DataError, match="no positive"):
        record_to_row(Record("q", [], ["n"]))
    with pytest.raises(ConfigError):
        record_to_row(RECORDS[0], "pool")
    with pytest.raises(ConfigError):
        record_to_row(RECORDS[0], "hfemb", extra="some")


@pytest.mark.parametrize("first, second", list(itertools.product(FORMATS, repeat=2)))
def test_round_trip_every_pair_of_formats(tmp_path, first, second):
    a, b = tmp_path / f"a.{first}.jsonl", tmp_path / f"b.{second}.json"
    write_records(RECORDS, a, first)
    once = read_records(a)
    assert once.format == first
    write_records(once.records, b, second)
    twice = read_records(b)
    assert twice.format == second

    def keep(extra):
        return KEPT_EXTRA[second](KEPT_EXTRA[first](extra))

    # only flagembedding keeps several positives in one row; the others split a record per positive
    if first == second == "flagembedding":
        expected = [(r.query, r.positives, r.negatives, [], keep(r.extra)) for r in RECORDS]
    else:
        expected = split(RECORDS, keep)
    assert core(twice.records) == expected
    # with extra="all" every key survives every pair of formats
    write_records(RECORDS, a, first, extra="all")
    write_records(read_records(a).records, b, second, extra="all")
    full = [(r.query, r.positives, r.negatives, [], r.extra) for r in RECORDS]
    assert core(read_records(b).records) == (full if first == second == "flagembedding" else split(RECORDS))
    # and writing the result again in the first format reads back the same
    c = tmp_path / "c.jsonl.gz"
    write_records(twice.records, c, first)
    assert core(read_records(c).records) == expected


def test_pool_and_pairs_convert_to_training_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    pool = read_records(DATA / "pool_documents.jsonl").records
    assert write_records(pool, out, "flagembedding") == 1  # the record without a positive is not written
    assert json.loads(out.read_text("utf-8")) == {
        "query": "高血压饮食", "pos": ["少盐清淡。", "每天不超过六克盐。"], "neg": ["多吃咸菜。", "无关内容。"]}


def test_write_row_counts_and_atomic_failure(tmp_path):
    out = tmp_path / "out.jsonl"
    assert write_records(RECORDS, out, "hfemb") == 4
    assert write_records(RECORDS, out, "flagembedding") == 3
    before = out.read_bytes()
    bad = [RECORDS[0], Record("q", ["p"], extra={"obj": object()})]
    with pytest.raises(DataError, match="cannot write record"):
        write_records(bad, out, "hfemb")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left
    with pytest.raises(DataError, match="empty or non-string text"):
        write_records([Record("q", [""])], tmp_path / "new.jsonl")
    assert not (tmp_path / "new.jsonl").exists()


# --------------------------------------------------------------------------- real files (../shared/data)

def test_embedded_sample(zh_sample_csv):
    import pandas as pd

    frame = pd.read_csv(zh_sample_csv, dtype=str, keep_default_na=False)
    result = read_records(zh_sample_csv)
    assert result.format == "qa_table" and len(result.records) == len(frame) == 600 and not result.skipped
    assert [r.extra["department"] for r in result.records] == list(frame.department)
    blocks = read_records(zh_sample_csv.parent / "internal_medicine_qa_short_sample.txt")
    assert blocks.format == "qa_blocks" and len(blocks.records) == 60 and not blocks.skipped


def test_real_medical_qa(shared_data):
    import pandas as pd

    path = shared_data / "zh_medical_qa" / "internal_medicine_qa.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    records = read_records(path).records
    assert len(records) == len(frame) == 7644
    row = frame.iloc[123]
    assert records[123].query == "\n".join(p for p in (row.title.strip(), row.ask.strip()) if p)
    assert records[123].positives == [row.answer.strip()]
    blocks = read_records(shared_data / "zh_medical_qa" / "internal_medicine_qa_short.txt")
    assert blocks.format == "qa_blocks" and len(blocks.records) == 4048 and not blocks.skipped
    # the short file joins title and ask with ","
    assert blocks.records[0].query == f"{frame.title[0]},{frame.ask[0]}"


def test_real_kuake_qqr(shared_data):
    import pandas as pd

    path = shared_data / "kuake_qqr" / "dev.json"
    frame = pd.read_json(path, dtype=False)
    numeric = frame[frame.label.isin(["0", "1", "2"])]
    assert len(frame) == 1600 and len(numeric) == 1599
    result = read_records(path, on_error="skip", label_threshold=2)
    assert [(e.kind, e.field) for e in result.skipped] == [("bad label", "label")]
    assert sum(len(r.candidates) for r in result.records) == 1599
    assert len(result.records) == numeric.query1.nunique()
    assert sum(len(r.positives) for r in result.records) == (numeric.label == "2").sum()
    with pytest.raises(DataError, match="field 'label': bad label"):
        read_records(path)


def test_real_lcqmc(shared_data):
    import pandas as pd

    for name, pairs in (("dev.tsv", 8802), ("test.tsv", 12500)):
        path = shared_data / "lcqmc" / name
        frame = pd.read_csv(path, sep="\t", header=None, quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
        first = frame[0].str.strip().str.lstrip("\ufeff")
        result = read_records(path)
        assert result.format == "pairs" and result.rows == len(frame) == pairs
        assert sum(len(r.candidates) for r in result.records) == pairs
        assert len(result.records) == first.nunique()
        assert sum(len(r.positives) for r in result.records) == (frame[2] == "1").sum()
        assert not any(t.startswith("\ufeff") for r in result.records for t in (r.query, *r.positives, *r.negatives))


def test_real_wikiqa(shared_data):
    import pandas as pd

    for split_name, questions_with_positive in (("dev", 126), ("test", 243), ("train", 873)):
        path = shared_data / "wikiqa" / f"WikiQA-{split_name}.tsv.gz"
        frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE)
        result = read_records(path)
        assert result.format == "wikiqa"
        assert len(result.records) == frame.QuestionID.nunique()
        assert sum(bool(r.positives) for r in result.records) == questions_with_positive
        assert (frame.groupby("QuestionID").Label.max() > 0).sum() == questions_with_positive
        assert sum(len(r.candidates) for r in result.records) == len(frame)


def test_real_file_copied_to_gz_json(shared_data, tmp_path):
    src_path = shared_data / "kuake_qqr" / "dev.json"
    packed = tmp_path / "dev.json.gz"
    with open(src_path, "rb") as fin, gzip.open(packed, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    plain = read_records(src_path, bad_label="skip")
    zipped = read_records(packed, bad_label="skip")
    assert core(zipped.records) == core(plain.records)
    assert zipped.skipped[0].line == plain.skipped[0].line == 50
