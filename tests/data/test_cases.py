"""hfemb.data.cases and `hfemb convert --knowledge`: query template, knowledge files, missing labels reported, the
per-case candidate layout as a labelled pool, corpus-mode mining over the knowledge base (hard negatives ==
rank-bm25's best non-positive entry), and the real TCM-SD sample from ../shared (skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from hfemb.data import cases
from hfemb.mining.bm25 import tokenize
from hfemb.cli import main
from hfemb.data.formats import read_records
from hfemb.errors import ConfigError, DataError

TCM = Path(__file__).parents[1] / "fixtures" / "tcm"
CASES, KB_TSV, KB_JSONL, CANDIDATES = (TCM / "cases.jsonl", TCM / "knowledge.tsv", TCM / "knowledge.jsonl",
                                       TCM / "cases_with_candidates.jsonl")
NAMES = ["风寒束表证", "风热犯表证", "肝阳上亢证", "脾胃虚弱证", "心血瘀阻证"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def case_rows() -> list[dict]:
    return rows(CASES)


def where(line=1):
    return ("cases.jsonl", line)


# ----------------------------------------------------------------------------------------- query template
def test_default_template_and_rendering():
    assert cases.query_template() == "主诉：{chief_complaint}\n现病史：{medical_history}\n四诊摘要：{FDMR}"
    c1, _, c3 = case_rows()[:3]
    settings = cases.CaseSettings()
    assert cases.render_query(c1, settings, where()) == (
        "主诉：恶寒发热2天，无汗。\n现病史：2天前淋雨受凉后出现恶寒重、发热轻，头身疼痛，鼻塞流清涕，咳嗽痰白清稀。\n"
        "四诊摘要：舌淡红，苔薄白，脉浮紧。")
    # c3's FDMR is empty: its line is dropped
    assert cases.render_query(c3, settings, where(3)) == (
        "主诉：头晕胀痛3天。\n现病史：3天前与人争吵后出现头晕胀痛，急躁易怒，面红目赤，口苦，夜寐多梦。")
    assert cases.render_query({**c3, "FDMR": None, "chief_complaint": "  "}, settings, where()) == \
        "现病史：3天前与人争吵后出现头晕胀痛，急躁易怒，面红目赤，口苦，夜寐多梦。"


def test_field_names_and_custom_templates():
    fields, names = cases.parse_query_fields("chief_complaint=CC, medical_history ,FDMR=四诊")
    assert fields == ["chief_complaint", "medical_history", "FDMR"] and names == {"chief_complaint": "CC", "FDMR": "四诊"}
    assert cases.query_template(fields, names) == "CC: {chief_complaint}\n现病史：{medical_history}\n四诊：{FDMR}"
    assert cases.query_template(["title"]) == "title: {title}"
    c1 = case_rows()[0]
    s = cases.CaseSettings(template="{chief_complaint}（{norm_syndrome}?）\n体征 {FDMR}", label_field="norm_syndrome")
    assert s.fields == ["chief_complaint", "norm_syndrome", "FDMR"]
    assert cases.render_query(c1, s, where()) == "恶寒发热2天，无汗。（风寒束表证?）\n体征 舌淡红，苔薄白，脉浮紧。"
    with pytest.raises(ConfigError, match="must name case fields"):
        cases.CaseSettings(template="no fields here")
    with pytest.raises(ConfigError, match="bad query template"):
        cases.CaseSettings(template="{chief_complaint")
    with pytest.raises(ConfigError, match="names no field"):
        cases.parse_query_fields(" , ")


def test_bad_case_rows_name_file_line_and_field():
    c1 = case_rows()[0]
    s = cases.CaseSettings()
    with pytest.raises(DataError) as exc:
        cases.render_query({k: v for k, v in c1.items() if k != "FDMR"}, s, where(7))
    assert (exc.value.path, exc.value.line, exc.value.field) == ("cases.jsonl", 7, "FDMR")
    with pytest.raises(DataError, match="every query field is empty"):
        cases.render_query({**c1, "chief_complaint": "", "medical_history": None, "FDMR": " "}, s, where())
    with pytest.raises(DataError, match="field 'medical_history': wrong type"):
        cases.render_query({**c1, "medical_history": ["a"]}, s, where())
    with pytest.raises(DataError, match="field 'norm_syndrome': empty field"):
        cases.case_label({**c1, "norm_syndrome": ""}, s, where())


# ----------------------------------------------------------------------------------------- knowledge files
def test_knowledge_tsv_with_header_and_crlf_equals_jsonl_with_alternative_keys():
    tsv, jsonl = cases.read_knowledge(KB_TSV), cases.read_knowledge(KB_JSONL)
    assert list(tsv) == NAMES and tsv == jsonl
    assert tsv["脾胃虚弱证"] == "脾胃虚弱证，脾胃气虚，运化失职，以食少、腹胀、便溏、神疲乏力、舌淡脉弱为主要表现的证候。"


def test_knowledge_errors(tmp_path):
    dup = tmp_path / "dup.tsv"
    dup.write_text("甲证\t甲的描述\n乙证\t乙的描述\n\n甲证\t另一描述\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        cases.read_knowledge(dup)
    assert exc.value.line == 4 and "duplicate knowledge entry '甲证' (first on line 1)" in str(exc.value)
    dup_json = tmp_path / "dup.jsonl"
    dup_json.write_text('{"name": "甲证", "text": "x"}\n{"syndrome": "甲证", "content": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dup.jsonl:2, field 'syndrome': duplicate knowledge entry"):
        cases.read_knowledge(dup_json)
    no_tab = tmp_path / "notab.tsv"
    no_tab.write_text("甲证\t甲的描述\n乙证 乙的描述\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notab.tsv:2: expected 'name<TAB>text'"):
        cases.read_knowledge(no_tab)
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"name": "甲证", "description": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"field 'text': missing field: expected one of text, knowledge, content"):
        cases.read_knowledge(no_text)
    (tmp_path / "empty.tsv").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no knowledge entries"):
        cases.read_knowledge(tmp_path / "empty.tsv")


# ----------------------------------------------------------------------------------------- cases -> records
def test_cases_against_knowledge_report_missing_labels():
    kb = cases.read_knowledge(KB_TSV)
    result = cases.read_cases(CASES, knowledge=kb)
    assert [r.extra for r in result.records] == [{"case_id": f"c{i}", "label": NAMES[i - 1]} for i in range(1, 6)]
    assert [r.positives for r in result.records] == [[kb[n]] for n in NAMES]
    assert all(not r.negatives and not r.candidates for r in result.records)
    assert result.missing_label == [("c6", "痰湿阻肺证")] and result.rows == 6
    assert result.summary_lines(kb) == [
        f"read {CASES}: 6 case rows -> 5 records", "knowledge base: 5 entries; 5 of them are case labels",
        "cases whose label is not in the knowledge base: 1 (not written; first: c6 (痰湿阻肺证))"]


def test_bad_rows_skip_or_raise(tmp_path):
    bad = tmp_path / "cases.jsonl"
    lines = CASES.read_text("utf-8").splitlines()
    bad.write_text("\n".join([lines[0], '{"example_id": "x", "chief_complaint": "咳嗽"}', "not json", lines[1]]) + "\n",
                   encoding="utf-8")
    kb = cases.read_knowledge(KB_TSV)
    with pytest.raises(DataError) as exc:
        cases.read_cases(bad, knowledge=kb)
    assert (exc.value.line, exc.value.field) == (2, "medical_history")
    result = cases.read_cases(bad, knowledge=kb, on_error="skip")
    assert [r.extra["case_id"] for r in result.records] == ["c1", "c2"] and len(result.skipped) == 2
    assert [e.line for e in result.skipped] == [2, 3]


def test_candidate_layout_is_a_labelled_pool():
    kb = cases.read_knowledge(KB_TSV)
    row = rows(CANDIDATES)[0]
    split = cases.split_candidates(row, where())
    assert [n for n, _ in split] == ["风热犯表证", "风寒束表证", "脾胃虚弱证"]
    # each paragraph is "<name>的定义是" + the entry's description
    assert [t for _, t in split] == [f"{n}的定义是{kb[n].split('，', 1)[1]}" for n, _ in split]
    rec = cases.candidate_record(row, where())
    assert rec.candidates == [(split[0][1], 0), (split[1][1], 1), (split[2][1], 0)]
    assert rec.positives == [split[1][1]] and rec.negatives == [split[0][1], split[2][1]]
    assert rec.extra == {"case_id": "c1", "label": "风寒束表证"}
    # auto-detected by read_records; a list knowledge_para works too
    result = read_records(CANDIDATES)
    assert result.format == "case_candidates" and [len(r.candidates) for r in result.records] == [3, 3, 2]
    assert result.records[2].positives == [f"心血瘀阻证的定义是{kb['心血瘀阻证'].split('，', 1)[1]}"]
    assert result.records[1].query == cases.render_query(rows(CANDIDATES)[1], cases.CaseSettings(), where())
    merged = cases.knowledge_from_candidates(CANDIDATES)
    assert sorted(merged) == sorted(NAMES) and merged["脾胃虚弱证"].startswith("脾胃虚弱证的定义是")
    assert cases.read_knowledge(CANDIDATES) == merged  # --knowledge accepts the candidate layout


def test_candidate_layout_errors(tmp_path):
    row = rows(CANDIDATES)[0]
    with pytest.raises(DataError, match=r"cannot find candidate 2 '心血瘀阻证'"):
        cases.split_candidates({**row, "knowledge_option": ["风热犯表证", "风寒束表证", "心血瘀阻证"]}, where())
    with pytest.raises(DataError, match="text before the first candidate"):
        cases.split_candidates({**row, "knowledge_para": "前言。" + row["knowledge_para"]}, where())
    with pytest.raises(DataError, match="expected 2 non-empty texts"):
        cases.split_candidates({**row, "knowledge_option": ["甲证", "乙证"], "knowledge_para": ["甲"]}, where())
    with pytest.raises(DataError, match="'风热犯表证' is listed twice"):
        cases.split_candidates({**row, "knowledge_option": ["风热犯表证", "风热犯表证"]}, where())
    other = dict(rows(CANDIDATES)[2])
    other["knowledge_para"] = ["脾胃虚弱证的定义是另一段描述。", other["knowledge_para"][1]]
    path = tmp_path / "conflict.jsonl"
    path.write_text(CANDIDATES.read_text("utf-8") + json.dumps(other, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"conflict.jsonl:4, field 'knowledge_para': candidate '脾胃虚弱证' has another "
                                        r"text than on line 1"):
        cases.knowledge_from_candidates(path)
    # a label that is none of the candidates: no positive, reported
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({**row, "norm_syndrome": "肝阳上亢证"}, ensure_ascii=False) + "\n", encoding="utf-8")
    result = cases.read_cases(missing)
    assert result.records == [] and result.missing_label == [("c1", "肝阳上亢证")]
    with pytest.raises(DataError, match="pass --knowledge FILE"):
        cases.read_cases(CASES)


# ----------------------------------------------------------------------------------------- the commands
def test_convert_cases_with_knowledge_then_mine_over_the_knowledge_base(tmp_path, capsys):
    out, corpus = tmp_path / "train.jsonl", tmp_path / "kb.jsonl"
    assert main(["convert", "--input", str(CASES), "--knowledge", str(KB_TSV), "--query-fields",
                 "chief_complaint,medical_history,FDMR", "--label-field", "norm_syndrome", "--output", str(out),
                 "--corpus-output", str(corpus)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"read {CASES}: 6 case rows -> 5 records",
                       "knowledge base: 5 entries; 5 of them are case labels",
                       "cases whose label is not in the knowledge base: 1 (not written; first: c6 (痰湿阻肺证))",
                       f"wrote {out}: 5 rows (hfemb)", f"wrote {corpus}: 5 knowledge texts (mining corpus)"]
    kb = cases.read_knowledge(KB_TSV)
    written = rows(out)
    assert written[0] == {"query": cases.render_query(case_rows()[0], cases.CaseSettings(), where()),
                          "positive": kb["风寒束表证"], "negative": [], "case_id": "c1", "label": "风寒束表证"}
    assert [r["positive"] for r in written] == [kb[n] for n in NAMES]
    assert rows(corpus) == [{"text": kb[n], "name": n} for n in NAMES]

    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--input", str(out), "--mode", "corpus", "--corpus", str(corpus), "--output", str(mined),
                 "--num-negatives", "2", "--num-hard", "1", "--hard-top-k", "1", "--easy-bottom-k", "1",
                 "--no-cache"]) == 0
    texts = list(kb.values())
    ref = BM25Okapi(tokenize(texts, "jieba", use_cache=False))
    for row in rows(mined):
        scores = ref.get_scores(tokenize([row["query"]], "jieba", use_cache=False)[0])
        others = [i for i, t in enumerate(texts) if t != row["positive"]]
        best, worst = max(others, key=lambda i: scores[i]), min(others, key=lambda i: scores[i])
        assert row["negative"] == [texts[best], texts[worst]]  # the most / least similar other syndrome
        assert row["mining"]["kinds"] == ["hard", "easy"]
        np.testing.assert_allclose(row["mining"]["bm25"], [scores[best], scores[worst]], rtol=1e-6)


def test_convert_templates_pools_and_errors(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["convert", "--input", str(CASES), "--knowledge", str(KB_JSONL), "--query-template",
                 "{chief_complaint}\\n{FDMR}", "--output", str(out), "--extra", "none"]) == 0
    assert [r["query"] for r in rows(out)][:3] == ["恶寒发热2天，无汗。\n舌淡红，苔薄白，脉浮紧。",
                                                   "发热咽痛1天。\n舌边尖红，苔薄黄，脉浮数。", "头晕胀痛3天。"]
    assert set(rows(out)[0]) == {"query", "positive", "negative"}
    # the candidate layout without a knowledge base: pools, the other candidates are the negatives
    pools = tmp_path / "pools.jsonl"
    assert main(["convert", "--input", str(CANDIDATES), "--query-fields", "chief_complaint=主诉", "--output",
                 str(pools)]) == 0
    got = rows(pools)
    assert [r["query"] for r in got] == ["主诉：恶寒发热2天，无汗。", "主诉：头晕胀痛3天。", "主诉：胸闷刺痛半月。"]
    assert [len(r["negative"]) for r in got] == [2, 2, 1] and got[0]["positive"].startswith("风寒束表证的定义是")
    capsys.readouterr()
    for argv, message in (
            (["--knowledge", str(KB_TSV), "--query-fields", "FDMR", "--query-template", "{FDMR}"], "not both"),
            (["--corpus-output", str(tmp_path / "c.jsonl")], "needs --knowledge"),
            (["--knowledge", str(KB_TSV), "--query-columns", "a", "--positive-column", "b"], "exclude"),
            (["--knowledge", str(KB_TSV), "--label-field", "example_id"], "no case could be written")):
        assert main(["convert", "--input", str(CASES), "--output", str(tmp_path / "x.jsonl"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


# ----------------------------------------------------------------------------------------- real TCM-SD sample
def test_real_tcm_sd_sample(shared_data, tmp_path, capsys):
    folder = shared_data / "tcm_sd_sample"
    case_file, with_knowledge = folder / "TCM-SD_data_sample.json", folder / "TCM-SD_data_sample_with_knowledge.json"
    real = rows(with_knowledge)
    kb = cases.knowledge_from_candidates(with_knowledge)
    assert len(kb) == len({n for r in real for n in r["knowledge_option"]})
    for r in real:  # every candidate's paragraph starts with its name, and they tile knowledge_para
        split = cases.split_candidates(r, ("x", 1))
        assert all(t.startswith(n + "的定义是") for n, t in split)
        assert " ".join(t for _, t in split) == r["knowledge_para"].strip()
    # the sample knowledge corpus covers none of the five cases: all reported, nothing written
    assert main(["convert", "--input", str(case_file), "--knowledge", str(folder / "knowledge_corpus_sample.txt"),
                 "--output", str(tmp_path / "none.jsonl")]) == 2
    out = capsys.readouterr().out
    assert "cases whose label is not in the knowledge base: 5 (not written; first: 440793 (气虚血瘀证)," in out
    # the knowledge base of all candidates, straight from the _with_knowledge file
    assert main(["convert", "--input", str(case_file), "--knowledge", str(with_knowledge), "--output",
                 str(tmp_path / "train.jsonl")]) == 0
    assert "knowledge base: 23 entries; 5 of them are case labels" in capsys.readouterr().out
    written = rows(tmp_path / "train.jsonl")
    assert [w["label"] for w in written] == [r["norm_syndrome"] for r in real]
    assert all(w["positive"] == kb[w["label"]] and w["query"].startswith("主诉：") for w in written)
    pools = read_records(with_knowledge)
    assert pools.format == "case_candidates"
    assert [(len(r.positives), len(r.negatives)) for r in pools.records] == [(1, 4)] * 5
    assert [r.query for r in pools.records] == [w["query"] for w in written]


def test_tcm_sd_config_trains_on_converted_and_mined_cases(tiny_qwen3, tmp_path, capsys):
    """configs/tcm_sd_lora.json (only the model, sizes and steps shrunk) on convert + corpus-mined cases."""
    from hfemb.training.config import load_config
    from hfemb.training.runner import run_training

    train, corpus, mined = tmp_path / "train.cases.jsonl", tmp_path / "knowledge.jsonl", tmp_path / "train.mined.jsonl"
    assert main(["convert", "--input", str(CASES), "--knowledge", str(KB_TSV), "--output", str(train),
                 "--corpus-output", str(corpus)]) == 0
    assert main(["mine", "--input", str(train), "--mode", "corpus", "--corpus", str(corpus), "--output", str(mined),
                 "--num-negatives", "2", "--num-hard", "1", "--no-cache"]) == 0
    config = Path(__file__).resolve().parents[2] / "configs" / "tcm_sd_lora.json"
    cfg = load_config(config, [
        f"model.name_or_path={tiny_qwen3}", "model.torch_dtype=float32", f"data.train_file={mined}",
        f"data.eval_file={mined}", "data.num_negatives=2", "data.query_max_len=64", "data.passage_max_len=48",
        "lora.r=2", f"training.output_dir={tmp_path / 'run'}", "training.bf16=false",
        "training.gradient_checkpointing=false", "training.per_device_train_batch_size=5", "training.max_steps=2",
        "training.eval_steps=1", "training.save_steps=1", "training.logging_steps=1", "training.report_to=none",
        "training.disable_tqdm=true"])
    assert cfg.loss.mask_duplicates and not cfg.loss.mask_false_negatives  # same-text positives only (a 2.0 margin never fired)
    summary = run_training(cfg)
    assert summary["data"]["train"]["rows"] == 5 and summary["global_step"] == 2
    assert np.isfinite(summary["final_eval"]["eval_loss"])
    # run_training draws the curves before the model cards, which copy and embed them
    from hfemb.publishing.plotting import CURVES_FILE, read_train_log

    out = tmp_path / "run"
    log = read_train_log(out / "train_log.jsonl")
    assert log.finished and log.points("loss")[0] == [1, 2] and log.points("eval_loss")[0] == [1, 2]
    png = out / CURVES_FILE
    for sub in ("merged", "adapter"):
        assert (out / sub / CURVES_FILE).read_bytes() == png.read_bytes()
        assert f"![training curves]({CURVES_FILE})" in (out / sub / "README.md").read_text(encoding="utf-8")
