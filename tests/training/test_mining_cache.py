"""The training mining cache (issue 13, item 4) is keyed on the records the miner receives: the same file
read with another ``label_threshold`` (or format / columns) mines again instead of reusing old negatives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import make_config  # noqa: E402


def test_label_threshold_change_is_not_served_from_the_cache(tmp_path):
    from hfemb.training.data_rows import load_rows

    pools = []
    for i in range(6):
        docs = [{"content": f"问题{i}的最佳答案", "label": 2}, {"content": f"问题{i}的部分答案", "label": 1}]
        docs += [{"content": f"无关文本{i}-{k}", "label": 0} for k in range(3)]
        pools.append({"query": f"问题{i}", "documents": docs})
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pools), encoding="utf-8")
    cache = tmp_path / "cache"
    results = {}
    for threshold in (1, 2, 1):
        cfg = make_config("unused-model", str(path), tmp_path / "o", data={"label_threshold": threshold, "num_negatives": 1},
                          mining={"num_hard": 1})
        report: dict = {}
        rows = load_rows(cfg, str(path), cache, report, "train")
        results.setdefault(threshold, []).append((rows, report["train"]["mining"]["cache"]))
    (rows1, cache1), (rows1_again, cache1_again) = results[1]
    rows2, cache2 = results[2][0]
    assert cache1 != cache2 and cache1 == cache1_again and rows1 == rows1_again
    assert len(list(cache.glob("mined-*.jsonl"))) == 2
    # threshold 1: both answers are positives (2 rows per query); threshold 2: the partial answer is a negative
    assert len(rows1) == 12 and len(rows2) == 6
    assert all("部分答案" not in r["negatives"][0] for r in rows1)
    assert {r["positive"] for r in rows2} == {f"问题{i}的最佳答案" for i in range(6)}
