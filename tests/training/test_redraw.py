"""Per-epoch redraw of negatives (``data.redraw_negatives``): epoch 0 trains on the mined negatives, later
epochs on fresh draws from each row's pools (kinds, teacher scores and resume kept); errors name file and line."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from hfemb.data.formats import read_records
from hfemb.errors import ConfigError, DataError
from hfemb.testing.torchrun import run_torchrun
from hfemb.training.data_rows import rows_from_records
from hfemb.training.redraw import REDRAW_KEY, RedrawnRows, redrawn, simans_log_weights, weighted_sample

from tests.training.test_trainer import assert_resume_equals_uninterrupted, make_config


def _row(i: int, answers: list[str], teacher: bool = False) -> dict:
    """Row i of a mined file: 1 hard (pool of 4) + 1 easy (pool of 3) negative, answers of other rows."""
    hard_pool = [answers[(i + k) % len(answers)] for k in (1, 2, 3, 4)]
    easy_pool = [answers[(i + k) % len(answers)] for k in (9, 10, 11)]
    row = {"query": f"q{i} {answers[i][:20]}", "positive": answers[i], "negative": [hard_pool[1], easy_pool[2]],
           "mining": {"kinds": ["hard", "easy"]}, "negative_candidates": {"hard": hard_pool, "easy": easy_pool}}
    if teacher:  # a made-up teacher: score = position-coded, so a text's score is easy to look up
        score = {t: round(0.01 * (k + 1), 6) for k, t in enumerate(answers)}
        row.update(pos_scores=[0.9], neg_scores=[score[t] for t in row["negative"]],
                   negative_candidate_scores={kind: [score[t] for t in pool]
                                              for kind, pool in row["negative_candidates"].items()})
    return row


@pytest.fixture(scope="module")
def answers(zh_sample_csv):
    return [r.positives[0] for r in read_records(str(zh_sample_csv)).records[:24]]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_epoch_zero_is_the_mined_row_later_epochs_redraw_within_each_kind(answers, tmp_path):
    file_rows = [_row(i, answers, teacher=True) for i in range(24)]
    rows, _ = rows_from_records(read_records(_write(tmp_path / "m.jsonl", file_rows)).records, 2, seed=0)
    data = RedrawnRows(rows, seed=5)
    score = {t: 0.01 * (k + 1) for k, t in enumerate(answers)}
    assert [data[i] for i in range(24)] == rows  # epoch 0: exactly the mined negatives
    seen = Counter()
    for epoch in (1, 2, 3):
        data.set_epoch(epoch)
        for i, (row, mined) in enumerate(zip(data, file_rows)):  # iteration yields the stored rows
            drawn = data[i]
            assert drawn == redrawn(row, 5, epoch, i)  # deterministic in (seed, epoch, row)
            hard, easy = drawn["negatives"]
            assert hard in mined["negative_candidates"]["hard"] and easy in mined["negative_candidates"]["easy"]
            assert drawn["teacher_scores"] == pytest.approx([0.9, score[hard], score[easy]])
            assert drawn["query"] == row["query"] and drawn["positive"] == row["positive"]
            seen[i] += drawn["negatives"] != row["negatives"]
    assert sum(seen.values()) > 24  # most rows train on other negatives in later epochs
    data.set_epoch(0)
    assert data[3] == rows[3]


def test_longer_negative_lists_are_resampled_each_epoch(answers, tmp_path):
    """FlagEmbedding's neg lists (6 here, 2 used): a seeded sample in epoch 0, as before, fresh ones later."""
    file_rows = [{"query": f"q{i}", "pos": [answers[i]], "neg": [answers[(i + k) % 24] for k in range(1, 7)],
                  "pos_scores": [0.5], "neg_scores": [0.1 * k for k in range(1, 7)]} for i in range(24)]
    rows, _ = rows_from_records(read_records(_write(tmp_path / "f.jsonl", file_rows)).records, 2, seed=0)
    assert all(REDRAW_KEY in r for r in rows)
    draws = {tuple(redrawn(rows[0], 0, e, 0)["negatives"]) for e in range(1, 12)}
    assert len(draws) > 3
    for e in range(1, 5):
        row = redrawn(rows[7], 0, e, 7)
        negs = file_rows[7]["neg"]
        assert len(set(row["negatives"])) == 2 and set(row["negatives"]) <= set(negs)
        assert row["teacher_scores"][1:] == pytest.approx([0.1 * (negs.index(t) + 1) for t in row["negatives"]])


def test_rows_without_pools_or_with_unscored_pools_keep_their_negatives(answers, tmp_path):
    plain = [{k: v for k, v in _row(i, answers).items() if k != "negative_candidates"} for i in range(24)]
    rows, _ = rows_from_records(read_records(_write(tmp_path / "p.jsonl", plain)).records, 2, seed=0)
    assert not any(REDRAW_KEY in r for r in rows)
    teacher = [_row(i, answers, teacher=True) for i in range(24)]
    for r in teacher:
        del r["negative_candidate_scores"]  # teacher scores of the mined negatives only
    rows, _ = rows_from_records(read_records(_write(tmp_path / "t.jsonl", teacher)).records, 2, seed=0)
    assert not any(REDRAW_KEY in r for r in rows)


@pytest.mark.parametrize("change, field", [
    (lambda r: r["negative_candidates"]["hard"].remove(r["negative"][0]), "negative_candidates"),
    (lambda r: r["mining"].update(kinds=["hard"]), "mining.kinds"),
    (lambda r: r.update(negative_candidates={"hard": "not a list"}), "negative_candidates"),
    (lambda r: r.update(mining="not an object"), "mining.kinds"),
])
def test_inconsistent_pools_name_file_line_and_field(answers, tmp_path, change, field):
    file_rows = [_row(i, answers) for i in range(5)]
    change(file_rows[3])
    path = _write(tmp_path / "bad.jsonl", file_rows)
    with pytest.raises(DataError) as err:
        rows_from_records(read_records(path).records, 2, seed=0)
    assert f"{path}:4" in str(err.value) and field in str(err.value)


def test_off_switch_reads_no_pools_and_known_positives_leave_the_pools(answers, tmp_path):
    file_rows = [_row(i, answers) for i in range(5)]
    file_rows[3]["negative_candidates"]["hard"] = ["not the mined negative"]
    records = read_records(_write(tmp_path / "bad.jsonl", file_rows)).records
    rows, _ = rows_from_records(records, 2, seed=0, redraw=False)
    assert len(rows) == 5 and not any(REDRAW_KEY in r for r in rows)
    # two rows of one query: each one's positive is in the other's hard pool, and must not be drawn as a negative
    a, b = _row(0, answers), _row(0, answers)
    b["positive"] = a["negative_candidates"]["hard"][3]
    a["negative_candidates"]["hard"].append(b["positive"] + " ")  # (a different text: stays)
    rows, _ = rows_from_records(read_records(_write(tmp_path / "two.jsonl", [a, b])).records, 2, seed=0)
    pool = rows[0][REDRAW_KEY]["pools"][0]
    assert b["positive"] not in pool and b["positive"] + " " in pool and len(pool) == 4


def _train_negatives(tiny_qwen3, train_file, out, **data):
    """(query, negatives) the collator received, per epoch, in a 2-epoch run (batch 8: 3 steps per epoch)."""
    from hfemb.training import collator as collator_module
    from hfemb.training.runner import run_training

    seen: list[tuple[str, list[str]]] = []
    original = collator_module.MultiNegCollator.__call__

    def spy(self, features):
        if self.num_negatives == 2 and features and "positive" in features[0]:
            seen.extend((f["query"], f["negatives"]) for f in features)
        return original(self, features)

    collator_module.MultiNegCollator.__call__ = spy
    try:
        cfg = make_config(tiny_qwen3, train_file, out, data={"num_negatives": 2, **data},
                          training={"num_train_epochs": 2, "per_device_train_batch_size": 8})
        summary = run_training(cfg)
    finally:
        collator_module.MultiNegCollator.__call__ = original
    return seen[:24], seen[24:48], summary


def test_training_redraws_after_the_first_epoch_and_off_switch(tiny_qwen3, answers, tmp_path):
    file_rows = [_row(i, answers) for i in range(24)]
    train_file = _write(tmp_path / "mined.jsonl", file_rows)
    first, second, _ = _train_negatives(tiny_qwen3, train_file, tmp_path / "on")
    by_query = {r["query"]: r for r in file_rows}
    assert sorted(q for q, _ in first) == sorted(by_query) == sorted(q for q, _ in second)  # every row once
    assert all(n == by_query[q]["negative"] for q, n in first)  # epoch 0: the mined negatives
    for q, (hard, easy) in second:  # epoch 1: a hard one from the row's hard pool, an easy one from its easy pool
        assert hard in by_query[q]["negative_candidates"]["hard"] and easy in by_query[q]["negative_candidates"]["easy"]
    assert sum(n != by_query[q]["negative"] for q, n in second) > 12
    report = json.loads((tmp_path / "on" / "train_summary.json").read_text())["data"]["redraw_negatives"]
    assert report == {"rows": 24, "of": 24, "sampling": "uniform"}
    card = (tmp_path / "on" / "merged" / "README.md").read_text()
    assert "| negatives | redrawn every epoch after the first, from each row's mined pools or longer negative list " \
           "(24 of 24 rows) |" in card
    first, second, _ = _train_negatives(tiny_qwen3, train_file, tmp_path / "off", redraw_negatives=False)
    assert all(n == by_query[q]["negative"] for q, n in first + second)


def test_resume_across_an_epoch_boundary_equals_uninterrupted(tiny_qwen3, answers, tmp_path):
    train_file = _write(tmp_path / "mined.jsonl", [_row(i, answers) for i in range(16)])

    def cfg(out, steps):  # 16 rows, batch 8: epoch 1 (redrawn) is steps 3-4
        return make_config(tiny_qwen3, train_file, out, data={"num_negatives": 2}, training={
            "max_steps": steps, "per_device_train_batch_size": 8, "save_strategy": "steps", "save_steps": 2,
            "save_total_limit": 3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0})

    assert_resume_equals_uninterrupted(cfg, tmp_path)


def test_resume_inside_a_redrawn_epoch_equals_uninterrupted(tiny_qwen3, answers, tmp_path):
    """24 rows, batch 8: 3 steps per epoch; checkpoint-4 is inside epoch 1, so the resumed run skips a batch of
    a redrawn epoch (transformers' skip_first_batches, where accelerate's set_epoch reaches no dataset)."""
    from hfemb.training.runner import run_training

    train_file = _write(tmp_path / "mined.jsonl", [_row(i, answers) for i in range(24)])

    def cfg(out, steps):
        return make_config(tiny_qwen3, train_file, out, data={"num_negatives": 2}, training={
            "max_steps": steps, "per_device_train_batch_size": 8, "save_strategy": "steps", "save_steps": 4,
            "save_total_limit": 3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0})

    run_training(cfg(tmp_path / "full", 6))
    run_training(cfg(tmp_path / "cut", 4))
    assert run_training(cfg(tmp_path / "cut", 6), resume=True)["resumed_from"].endswith("checkpoint-4")
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_the_trainer_gives_each_epoch_to_the_rows_and_its_sampler(tiny_qwen3, answers, tmp_path, monkeypatch):
    """Whatever wraps the dataloader (DDP's BatchSamplerShard, a resume's skip), the rows and hfemb's sampler
    learn the epoch from the Trainer itself before its batches are drawn."""
    from transformers import Trainer

    from tests.training.test_trainer import build_trainer

    rows, _ = rows_from_records(read_records(_write(tmp_path / "m.jsonl", [_row(i, answers) for i in range(8)])
                                             ).records, 2, seed=0)
    trainer, _ = build_trainer(make_config(tiny_qwen3, str(tmp_path / "m.jsonl"), tmp_path / "o",
                                           data={"num_negatives": 2}), RedrawnRows(rows, seed=0))
    trainer.no_duplicate_queries = True
    sampler = trainer._get_train_sampler()
    seen = []
    monkeypatch.setattr(Trainer, "_run_epoch", lambda self, model, epoch, *a, **k: seen.append(
        (epoch, self.train_dataset.epoch, sampler.epoch)))
    trainer._run_epoch(None, 2)
    assert seen == [(2, 2, 2)]


DDP_SCRIPT = """
import json, sys
from hfemb.training import collator as c
from hfemb.training.distributed import rank
from hfemb.training.runner import run_training
from tests.training.test_trainer import make_config
seen, original = [], c.MultiNegCollator.__call__
def spy(self, features):
    seen.extend((f["query"], f["negatives"]) for f in features)
    return original(self, features)
c.MultiNegCollator.__call__ = spy
model, train_file, out = sys.argv[1:4]
run_training(make_config(model, train_file, out, data={"num_negatives": 2},
                         training={"num_train_epochs": 2, "per_device_train_batch_size": 4}))
open(f"{out}/seen{rank()}.json", "w").write(json.dumps(seen))
"""


def test_two_processes_redraw_like_one(tiny_qwen3, answers, tmp_path):
    """torchrun, 2 gloo processes, 16 rows, 4 per process per step: epoch 0 on the mined negatives, epoch 1 on
    exactly the draws a single process makes for each row (`redrawn`), on both ranks."""
    file_rows = [_row(i, answers) for i in range(16)]
    train_file = _write(tmp_path / "mined.jsonl", file_rows)
    (tmp_path / "ddp_main.py").write_text(DDP_SCRIPT)
    run_torchrun(tmp_path / "ddp_main.py", tiny_qwen3, train_file, tmp_path / "out", timeout=600)
    rows, _ = rows_from_records(read_records(train_file).records, 2, seed=0)
    index = {r["query"]: i for i, r in enumerate(rows)}
    for r in range(2):
        seen = json.loads((tmp_path / "out" / f"seen{r}.json").read_text())
        first, second = seen[:8], seen[8:16]
        assert len(seen) == 16 and all(n == rows[index[q]]["negatives"] for q, n in first)
        assert all(n == redrawn(rows[index[q]], 0, 1, index[q])["negatives"] for q, n in second)
        assert sum(n != rows[index[q]]["negatives"] for q, n in second) >= 4


def test_persistent_workers_are_refused_with_redraw(tiny_qwen3, answers, tmp_path):
    from hfemb.training.runner import run_training

    train_file = _write(tmp_path / "mined.jsonl", [_row(i, answers) for i in range(8)])
    cfg = make_config(tiny_qwen3, train_file, tmp_path / "o", data={"num_negatives": 2}, training={
        "dataloader_num_workers": 1, "dataloader_persistent_workers": True})
    with pytest.raises(ConfigError, match="persistent"):
        run_training(cfg)


def test_simans_weights_by_hand():
    w = simans_log_weights([0.5, 0.6, 0.75, 0.2], positive=0.6, width=0.1)
    assert w == pytest.approx([-1.0, 0.0, -2.25, -16.0], rel=1e-12)
    with pytest.raises(ValueError):
        simans_log_weights([0.5], 0.6, 0.0)


def test_weighted_sample_matches_successive_sampling_probabilities():
    """Oracle: drawing k without replacement, each draw proportional to the weights left, gives the set
    {a, b} with probability w_a/W * w_b/(W - w_a) + w_b/W * w_a/(W - w_b)."""
    weights = [0.05, 1.0, 0.4, 2.0, 0.0]
    total = sum(weights)
    exact = {frozenset((a, b)): weights[a] / total * weights[b] / (total - weights[a])
             + weights[b] / total * weights[a] / (total - weights[b]) for a, b in itertools.combinations(range(5), 2)}
    rng, n = random.Random(0), 40000
    logs = [math.log(w) if w > 0 else -math.inf for w in weights]
    seen = Counter(frozenset(weighted_sample(rng, [10, 11, 12, 13, 14], logs, 2)) for _ in range(n))
    for pair, p in exact.items():
        got = seen[frozenset(10 + j for j in pair)] / n
        assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (pair, got, p)
    assert all(14 not in s for s in seen)  # weight 0: never while others are left
    assert weighted_sample(random.Random(1), [7, 8], [-math.inf, -math.inf], 2) == [7, 8]  # all zero: still k
    # far-apart log weights (weights that would underflow as plain floats) still draw by their ratio
    far = Counter(weighted_sample(rng, [0, 1], [-2000.0, -2000.0 - math.log(3)], 1)[0] for _ in range(4000))
    assert abs(far[0] / 4000 - 0.75) < 0.03


def test_simans_redraw_prefers_candidates_the_teacher_scores_near_the_positive(answers, tmp_path):
    row = _row(0, answers, teacher=True)
    pool = row["negative_candidates"]["hard"]
    row["negative_candidate_scores"]["hard"] = [0.2, 0.85, 0.6, 0.3]  # positive: 0.9
    row["neg_scores"][0] = 0.85
    rows, _ = rows_from_records(read_records(_write(tmp_path / "t.jsonl", [row])).records, 2, seed=0)
    hard = Counter()
    for epoch in range(1, 401):
        drawn = redrawn(rows[0], 3, epoch, 0, simans_width=0.1)
        hard[drawn["negatives"][0]] += 1
        k = pool.index(drawn["negatives"][0])  # the teacher score follows the drawn text
        assert drawn["teacher_scores"][1] == [0.2, 0.85, 0.6, 0.3][k]
        assert drawn["negatives"][1] in row["negative_candidates"]["easy"]
    w = [math.exp(v) for v in simans_log_weights([0.2, 0.85, 0.6, 0.3], 0.9, 0.1)]  # exp(-0.25) : exp(-9) : ...
    assert hard[pool[1]] / 400 > 0.95 and w[1] / sum(w) > 0.99
    assert hard[pool[0]] == 0 and hard[pool[3]] == 0
    uniform = Counter(redrawn(rows[0], 3, e, 0)["negatives"][0] for e in range(1, 401))
    assert max(uniform.values()) < 150  # uniform over the 4: about 100 each
    assert redrawn(rows[0], 3, 0, 0) is rows[0]  # uniform, epoch 0: the mined row
    row["negative"][0], row["neg_scores"][0] = pool[0], 0.2  # mined: the candidate SimANS almost never draws
    mined, _ = rows_from_records(read_records(_write(tmp_path / "m.jsonl", [row])).records, 2, seed=0)
    assert redrawn(mined[0], 3, 0, 0)["negatives"][0] == pool[0]  # uniform keeps it in epoch 0
    first = Counter(redrawn(mined[0], s, 0, 0, simans_width=0.1)["negatives"][0] for s in range(200))
    assert first[pool[1]] / 200 > 0.95 and first[pool[0]] == 0  # SimANS draws in epoch 0 too
    plain, _ = rows_from_records(read_records(_write(tmp_path / "p.jsonl", [_row(1, answers)])).records, 2, seed=0)
    assert redrawn(plain[0], 3, 0, 0, simans_width=0.1) is plain[0]  # no teacher scores: epoch 0 keeps the mined
    assert redrawn(plain[0], 3, 1, 0, simans_width=0.1) is not plain[0]  # later epochs draw (uniformly)


def test_simans_needs_teacher_scores(tiny_qwen3, answers, tmp_path):
    from hfemb.training.config import validate
    from hfemb.training.runner import run_training

    train_file = _write(tmp_path / "mined.jsonl", [_row(i, answers) for i in range(8)])
    with pytest.raises(ConfigError, match="teacher scores"):
        run_training(make_config(tiny_qwen3, train_file, tmp_path / "o", data={"num_negatives": 2,
                                                                               "redraw_sampling": "simans"}))
    with pytest.raises(ConfigError, match="'data.redraw_simans_width' must be a number > 0"):
        validate(make_config(tiny_qwen3, train_file, tmp_path / "o", data={"redraw_simans_width": 0}))


def test_training_on_teacher_rows_draws_by_the_teacher_by_default(tiny_qwen3, answers, tmp_path):
    file_rows = [_row(i, answers, teacher=True) for i in range(24)]
    train_file = _write(tmp_path / "mined.jsonl", file_rows)
    # rows with teacher scores: the default (auto) is simans; each kind's slots from its own pool (pool_negatives=0;
    # its default for these rows, whole-pool draws, is tested in test_pool_negatives)
    first, second, _ = _train_negatives(tiny_qwen3, train_file, tmp_path / "on", redraw_simans_width=0.05,
                                        pool_negatives=0)
    by_query = {r["query"]: r for r in file_rows}
    rows, _ = rows_from_records(read_records(train_file).records, 2, seed=0)
    index = {r["query"]: i for i, r in enumerate(rows)}
    top = 0
    for q, negatives in first:  # SimANS draws in epoch 0 too
        assert negatives == redrawn(rows[index[q]], 0, 0, index[q], simans_width=0.05)["negatives"]
    for q, negatives in second:  # make_config's seed is 0
        assert negatives == redrawn(rows[index[q]], 0, 1, index[q], simans_width=0.05)["negatives"]
        scores = by_query[q]["negative_candidate_scores"]["hard"]
        top += negatives[0] == by_query[q]["negative_candidates"]["hard"][scores.index(max(scores))]
    # the made-up teacher's pool scores are >= 0.01 apart, all far below the positive's 0.9: at width 0.05 the
    # highest-scored candidate outweighs the next by e^5 or more
    assert top >= 22
    summary = json.loads((tmp_path / "on" / "train_summary.json").read_text())
    assert summary["data"]["redraw_negatives"] == {"rows": 24, "of": 24, "sampling": "simans"}
    card = (tmp_path / "on" / "merged" / "README.md").read_text()
    assert "(24 of 24 rows), the ones the teacher scores near the positive more often (SimANS) |" in card


def test_auto_draws_uniformly_when_teacher_scores_are_not_cosines(tiny_qwen3, answers, tmp_path, caplog):
    """FlagEmbedding rows whose pos/neg_scores are reranker logits: a SimANS width in cosine units would make
    every epoch pick the same negatives, so auto stays uniform (and says why); cosine rows pass the check."""
    from hfemb.training.redraw import teacher_scores_are_cosines

    file_rows = [{"query": f"q{i} {answers[i][:20]}", "pos": [answers[i]],
                  "neg": [answers[(i + k) % 24] for k in (1, 2, 3, 4, 5)],
                  "pos_scores": [7.5], "neg_scores": [3.0, -1.5, 6.9, 0.2, 2.4]} for i in range(24)]
    train_file = _write(tmp_path / "fe.jsonl", file_rows)
    rows, _ = rows_from_records(read_records(train_file).records, 2, seed=0)
    assert not teacher_scores_are_cosines(rows)
    cosine_rows, _ = rows_from_records(read_records(_write(tmp_path / "m.jsonl", [_row(i, answers, teacher=True)
                                                                                 for i in range(4)])).records, 2, 0)
    assert teacher_scores_are_cosines(cosine_rows)
    with caplog.at_level("WARNING", logger="hfemb.training.redraw"):
        first, second, _ = _train_negatives(tiny_qwen3, train_file, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["data"]["redraw_negatives"]["sampling"] == "uniform"
    assert "not cosines in [-1, 1]" in caplog.text and "drawing uniformly" in caplog.text
    index = {r["query"]: i for i, r in enumerate(rows)}
    assert all(n == redrawn(rows[index[q]], 0, 1, index[q])["negatives"] for q, n in second)  # the uniform draws
