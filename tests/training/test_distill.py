"""Distillation (KL(teacher || student) over each row's candidates) and Matryoshka: by hand, against
torch's kl_div, with gathered documents, through the Trainer with and without GradCache, and the data path."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hfemb.data.formats import Record, read_records
from hfemb.errors import ConfigError, DataError
from hfemb.training.config import DEFAULT_DISTILL_WEIGHT, config_from_dict
from hfemb.training.data_rows import check_teacher_scores, rows_from_records
from hfemb.training.distill import distill_kl_loss, distill_mse_loss, matryoshka_loss, pair_rank_loss, truncate_normalize
from hfemb.training.loss import info_nce_loss, own_negative_mask

B, N = 4, 2


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_kl_by_hand():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    d = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [0.2, 1.0], [1.0, 0.1]]), dim=-1)  # G = 2
    teacher = torch.tensor([[0.9, 0.5], [0.8, 0.1]])
    t = 0.5
    expected = 0.0
    for i in range(2):
        s = [float(q[i] @ d[2 * i + k]) / t for k in range(2)]
        tt = [float(teacher[i, k]) / t for k in range(2)]
        zs, zt = math.log(sum(math.exp(x) for x in s)), math.log(sum(math.exp(x) for x in tt))
        expected += sum(math.exp(tt[k] - zt) * ((tt[k] - zt) - (s[k] - zs)) for k in range(2)) / 2
    assert float(distill_kl_loss(q, d, teacher, group_size=2, temperature=t)) == pytest.approx(expected, rel=1e-5)


def test_kl_matches_torch_kl_div_and_is_zero_for_a_perfect_student():
    q, d = _unit(B, 8, seed=1), _unit(B * 3, 8, seed=2)
    teacher = torch.rand(B, 3, generator=torch.Generator().manual_seed(3))
    ours = distill_kl_loss(q, d, teacher, group_size=3, temperature=0.05)
    student = torch.einsum("bd,bgd->bg", q, d.view(B, 3, -1)) / 0.05
    oracle = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher / 0.05, -1), reduction="batchmean")
    torch.testing.assert_close(ours, oracle)  # = sentence-transformers' DistillKLDivLoss / temperature**2
    assert ours > 0
    same = torch.einsum("bd,bgd->bg", q, d.view(B, 3, -1))
    assert float(distill_kl_loss(q, d, same, group_size=3, temperature=0.05)) == pytest.approx(0.0, abs=1e-6)


def test_kl_with_gathered_documents_equals_the_single_process_loss():
    b, g, w = 2, 3, 2
    q, d = _unit(w * b, 8, seed=4), _unit(w * b * g, 8, seed=5)
    teacher = torch.rand(w * b, g, generator=torch.Generator().manual_seed(6))
    full = distill_kl_loss(q, d, teacher, group_size=g)
    parts = [distill_kl_loss(q[r * b:(r + 1) * b], d, teacher[r * b:(r + 1) * b], group_size=g, doc_offset=r * b * g)
             for r in range(w)]
    torch.testing.assert_close(torch.stack(parts).mean(), full)
    with pytest.raises(ValueError):
        distill_kl_loss(q[:b], d, teacher[:b], group_size=g, doc_offset=w * b * g)


def test_mse_distillation_by_hand_zero_for_a_perfect_student_and_per_process():
    q, d = _unit(B, 8, seed=12), _unit(B * 3, 8, seed=13)
    teacher = torch.rand(B, 3, generator=torch.Generator().manual_seed(14))
    by_hand = sum((float(q[i] @ d[3 * i + k]) - float(teacher[i, k])) ** 2 for i in range(B) for k in range(3)) / (B * 3)
    assert float(distill_mse_loss(q, d, teacher, group_size=3)) == pytest.approx(by_hand, rel=1e-5)
    same = torch.einsum("bd,bgd->bg", q, d.view(B, 3, -1))
    assert float(distill_mse_loss(q, d, same, group_size=3)) == pytest.approx(0.0, abs=1e-10)
    # a constant shift of the teacher changes the MSE (absolute scale) but not the KL (relative scores)
    assert float(distill_mse_loss(q, d, same + 0.1, group_size=3)) == pytest.approx(0.01, rel=1e-4)
    assert float(distill_kl_loss(q, d, same + 0.1, group_size=3)) == pytest.approx(0.0, abs=1e-6)
    part = distill_mse_loss(q[2:], torch.cat([_unit(5, 8, seed=15), d[6:]]), teacher[2:], group_size=3, doc_offset=5)
    torch.testing.assert_close(part, distill_mse_loss(q[2:], d[6:], teacher[2:], group_size=3))


def test_pair_rank_loss_by_hand_and_equals_sentence_transformers_cosent():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    d = F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0], [0.2, 1.0], [1.0, 0.1]]), dim=-1)  # G = 2
    pos = [float(q[0] @ d[0]), float(q[1] @ d[2])]
    neg = [float(q[0] @ d[1]), float(q[1] @ d[3])]
    expected = math.log(1 + sum(math.exp(5.0 * (n - p)) for p in pos for n in neg))
    assert float(pair_rank_loss(q, d, group_size=2, scale=5.0)) == pytest.approx(expected, rel=1e-5)

    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    g = 3
    q, d = _unit(B, 8, seed=7), _unit(B * g, 8, seed=8)
    labels = torch.tensor([1.0 if k == 0 else 0.0 for _ in range(B) for k in range(g)])  # [B*G] positive first
    oracle = CoSENTLoss(torch.nn.Identity(), scale=20.0).compute_loss_from_embeddings(
        [q.repeat_interleave(g, dim=0), d], labels)  # every (query, document) pair of the batch
    torch.testing.assert_close(pair_rank_loss(q, d, group_size=g, scale=20.0), oracle)
    # a masked negative is left out: equals the loss without that pair (by hand)
    mask = torch.zeros(B, g - 1, dtype=torch.bool)
    mask[1, 0] = True
    sims = torch.einsum("bd,bgd->bg", q, d.view(B, g, -1))
    negs = [float(sims[i, k]) for i in range(B) for k in range(1, g) if not mask[i, k - 1]]
    by_hand = math.log(1 + sum(math.exp(20.0 * (n - float(sims[i, 0]))) for i in range(B) for n in negs))
    assert float(pair_rank_loss(q, d, group_size=g, negative_mask=mask)) == pytest.approx(by_hand, rel=1e-5)
    # with gathered documents each process scores its own rows (doc_offset)
    part = pair_rank_loss(q[2:], torch.cat([_unit(5, 8, seed=9), d[2 * g:]]), group_size=g, doc_offset=5)
    torch.testing.assert_close(part, pair_rank_loss(q[2:], d[2 * g:], group_size=g))


def test_own_negative_mask_reads_the_in_batch_and_own_group_masks():
    q, d = _unit(B, 8, seed=10), _unit(B * 3, 8, seed=11)
    ids = torch.arange(B * 3)
    ids[4] = ids[3]  # query 1's first negative has its positive's text
    for in_batch in (True, False):
        out = info_nce_loss(q, d, group_size=3, doc_text_ids=ids, in_batch_negatives=in_batch)
        expected = torch.zeros(B, 2, dtype=torch.bool)
        expected[1, 0] = True
        assert torch.equal(own_negative_mask(out, 3), expected)


def test_matryoshka_is_the_weighted_sum_over_truncated_prefixes():
    q, d = _unit(B, 16, seed=7), _unit(B * 3, 16, seed=8)

    def nce(qq, dd):
        return info_nce_loss(qq, dd, group_size=3).loss

    got = matryoshka_loss(q, d, nce, [16, 8, 4], [1.0, 0.5, 0.25])
    by_hand = 0.0
    for dim, w in ((16, 1.0), (8, 0.5), (4, 0.25)):
        qq, dd = q[:, :dim] / q[:, :dim].norm(dim=1, keepdim=True), d[:, :dim] / d[:, :dim].norm(dim=1, keepdim=True)
        by_hand += w * F.cross_entropy(qq @ dd.T / 0.1, torch.arange(B) * 3)
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(truncate_normalize(q, 16), q)


# ---- the data path -------------------------------------------------------------------------------
def test_rows_carry_teacher_scores_aligned_with_sampled_negatives():
    rec = Record("q", ["p0", "p1"], ["n0", "n1", "n2", "n3"], source="f:1",
                 extra={"pos_scores": [0.9, 0.8], "neg_scores": [0.1, 0.2, 0.3, 0.4]})
    rows, _ = rows_from_records([rec], 2, seed=0)
    for j, row in enumerate(rows):
        expected = [[0.9, 0.8][j]] + [0.1 + 0.1 * int(n[1]) for n in row["negatives"]]
        assert row["teacher_scores"] == pytest.approx(expected)
    plain, _ = rows_from_records([Record("q", ["p0", "p1"], ["n0", "n1", "n2", "n3"])], 2, seed=0)
    assert [r["negatives"] for r in plain] == [r["negatives"] for r in rows]  # same sample as before
    with pytest.raises(DataError, match="f:1.*neg_scores"):
        rows_from_records([Record("q", ["p"], ["a", "b"], source="f:1", extra={"pos_scores": [1.0],
                                                                            "neg_scores": [0.5]})], 2, seed=0)


def test_mined_file_with_teacher_scores_reads_back(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"query": "q", "positive": "p", "negative": ["a", "b"], "pos_scores": [0.7],
                                "neg_scores": [0.2, 0.1]}) + "\n")
    rows, _ = rows_from_records(read_records(str(path)).records, 2, seed=0)
    assert rows[0]["teacher_scores"] == [0.7, 0.2, 0.1]


def _cfg(tmp_path, **loss):
    return config_from_dict({"model": {"name_or_path": "x"}, "data": {"train_file": "t.jsonl", "num_negatives": N},
                             "loss": loss, "training": {"output_dir": str(tmp_path), "report_to": "none"}})


def test_config_checks(tmp_path):
    assert _cfg(tmp_path).loss.distill_weight is None
    rows = [{"query": "q", "positive": "p", "negatives": ["a", "b"]}]
    check_teacher_scores(rows, _cfg(tmp_path))  # no scores, default weight: fine
    with pytest.raises(ConfigError, match="carry no teacher scores"):
        check_teacher_scores(rows, _cfg(tmp_path, distill_weight=0.5))
    logits = [{**rows[0], "teacher_scores": [7.5, -2.0, 0.1]}]  # a reranker's logits, not cosines
    check_teacher_scores(logits, _cfg(tmp_path, distill_weight=1.0))  # KL: relative scores, fine
    with pytest.raises(ConfigError, match=r"training row 1: 'teacher_scores' .* has 7.5, outside \[-1, 1\]"):
        check_teacher_scores(logits, _cfg(tmp_path, distill_weight=1.0, distill_loss="mse"))
    with pytest.raises(ConfigError, match="1 of 2 training rows"):
        check_teacher_scores(rows + [{**rows[0], "teacher_scores": [1, 0, 0]}], _cfg(tmp_path))
    for loss, message in (({"distill_weight": -1}, "distill_weight"), ({"distill_temperature": 0}, "distill_temperature"),
                          ({"matryoshka_dims": [64, 0]}, "matryoshka_dims"), ({"matryoshka_dims": "64"}, "matryoshka_dims"),
                          ({"matryoshka_dims": [64], "matryoshka_weights": [1, 2]}, "matryoshka_weights"),
                          ({"matryoshka_weights": [1]}, "needs 'loss.matryoshka_dims'"),
                          ({"pair_rank_weight": -0.1}, "pair_rank_weight"), ({"distill_loss": "l2"}, "distill_loss"), ({"pair_rank_scale": 0}, "pair_rank_scale")):
        with pytest.raises(ConfigError, match=message):
            _cfg(tmp_path, **loss)


# ---- through the Trainer, plain and GradCache ----------------------------------------------------
@pytest.fixture(scope="module")
def rows(zh_sample_csv):
    recs = read_records(str(zh_sample_csv)).records[:8]
    return [{"query": r.query, "positive": r.positives[0],
             "negatives": [recs[(i + 3) % 8].positives[0], recs[(i + 5) % 8].positives[0]],
             "teacher_scores": [0.8, 0.3 + 0.05 * i, 0.1]} for i, r in enumerate(recs)]


def _trainer(model_path, tmp_path, loss):
    from hfemb.training.collator import MultiNegCollator
    from hfemb.training.run_setup import build_model, training_arguments
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    cfg = config_from_dict({
        "model": {"name_or_path": model_path, "finetune_type": "full", "torch_dtype": "float32"},
        "data": {"train_file": "unused.jsonl", "num_negatives": N}, "loss": loss,
        "training": {"output_dir": str(tmp_path), "report_to": "none", "save_strategy": "no", "seed": 0,
                     "per_device_train_batch_size": B, "disable_tqdm": True, "dataloader_pin_memory": False}})
    torch.manual_seed(0)
    model = build_model(cfg)
    trainer = MultiNegEmbeddingTrainer(
        model=model, args=training_arguments(cfg, has_eval=False), train_dataset=[], loss_config=cfg.loss,
        data_collator=MultiNegCollator(model, query_max_len=32, passage_max_len=48, num_negatives=N))
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _step(trainer, batch, mini_batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer.grad_cache_mini_batch = mini_batch
    loss = trainer.training_step(trainer.model, dict(batch))
    return float(loss), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _embed(trainer, batch):
    """The trainer's model in eval mode: (q [B, D], d [B*G, D]) of ``batch``, no gradients."""
    model = trainer.model
    model.eval()
    with torch.no_grad():
        return (model(batch["query_input_ids"], batch["query_attention_mask"]),
                model(batch["doc_input_ids"], batch["doc_attention_mask"]))


def _assert_grad_cache_agrees(trainer, batch):
    """A GradCache step (mini-batches of 3) has the plain step's loss and gradients."""
    plain_loss, plain = _step(trainer, batch, None)
    cached_loss, cached = _step(trainer, batch, 3)
    assert cached_loss == pytest.approx(plain_loss, abs=1e-5)
    assert plain.keys() == cached.keys() and plain
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_trainer_adds_the_distillation_term_and_grad_cache_agrees(tiny_qwen3, tmp_path, rows):
    trainer = _trainer(tiny_qwen3, tmp_path, {"matryoshka_dims": [64, 16], "distill_weight": 1.0})
    batch = trainer.data_collator(rows[:B])
    assert batch["teacher_scores"].shape == (B, 1 + N)
    q, d = _embed(trainer, batch)
    with torch.no_grad():
        got = trainer._loss(q, d, batch).loss
        nce = [info_nce_loss(truncate_normalize(q, k), truncate_normalize(d, k), group_size=1 + N,
                             doc_text_ids=batch["doc_text_ids"]).loss for k in (64, 16)]
        kl = distill_kl_loss(q, d, batch["teacher_scores"], group_size=1 + N)
    torch.testing.assert_close(got, nce[0] + nce[1] + 1.0 * kl)
    _assert_grad_cache_agrees(trainer, batch)
    assert DEFAULT_DISTILL_WEIGHT == 0  # off by default: distillation did not beat the defaults on WikiQA dev
    mse = _trainer(tiny_qwen3, tmp_path, {"distill_weight": 3.0, "distill_loss": "mse"})
    with torch.no_grad():
        torch.testing.assert_close(mse._loss(q, d, batch).loss, info_nce_loss(
            q, d, group_size=1 + N, doc_text_ids=batch["doc_text_ids"]).loss + 3.0 * distill_mse_loss(
            q, d, batch["teacher_scores"], group_size=1 + N))
    off = _trainer(tiny_qwen3, tmp_path, {})  # rows carry teacher scores, no weight given: plain InfoNCE
    with torch.no_grad():
        torch.testing.assert_close(off._loss(q, d, batch).loss, info_nce_loss(
            q, d, group_size=1 + N, doc_text_ids=batch["doc_text_ids"]).loss)


def test_trainer_adds_the_pair_rank_term_and_grad_cache_agrees(tiny_qwen3, tmp_path, rows):
    trainer = _trainer(tiny_qwen3, tmp_path, {"pair_rank_weight": 0.5, "pair_rank_scale": 10.0})
    batch = trainer.data_collator(rows[:B])
    q, d = _embed(trainer, batch)
    with torch.no_grad():
        got = trainer._loss(q, d, batch).loss
        nce = info_nce_loss(q, d, group_size=1 + N, doc_text_ids=batch["doc_text_ids"])
        rank = pair_rank_loss(q, d, group_size=1 + N, scale=10.0, negative_mask=own_negative_mask(nce, 1 + N))
    assert float(rank) > 0
    torch.testing.assert_close(got, nce.loss + 0.5 * rank)
    _assert_grad_cache_agrees(trainer, batch)


def test_run_training_with_teacher_scores_and_matryoshka_writes_the_dims(tiny_qwen3, tmp_path, rows):
    from hfemb.training.runner import run_training

    data = tmp_path / "mined.jsonl"
    data.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"], "negative": r["negatives"],
                                        "pos_scores": r["teacher_scores"][:1], "neg_scores": r["teacher_scores"][1:]},
                                       ensure_ascii=False) + "\n" for r in rows))
    raw = {"model": {"name_or_path": tiny_qwen3, "finetune_type": "full", "torch_dtype": "float32"},
           "data": {"train_file": str(data), "num_negatives": N, "mine": False},
           "loss": {"matryoshka_dims": [64, 32]},
           "training": {"output_dir": str(tmp_path / "out"), "report_to": "none", "save_strategy": "no",
                        "max_steps": 1, "per_device_train_batch_size": B, "disable_tqdm": True,
                        "dataloader_pin_memory": False}}
    summary = run_training(config_from_dict(raw))
    assert math.isfinite(summary["train"]["train_loss"])
    info = json.loads((tmp_path / "out" / "merged" / "matryoshka.json").read_text())
    assert info["dims"] == [64, 32] and info["weights"] == [1.0, 1.0]
    raw["loss"] = {"distill_weight": 1.0}
    data.write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"], "negative": r["negatives"]},
                                       ensure_ascii=False) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="carry no teacher scores"):
        run_training(config_from_dict(raw))


def test_trainer_adds_the_document_to_query_term_at_every_matryoshka_dimension(tiny_qwen3, tmp_path, rows):
    from hfemb.training.loss import document_to_query_loss

    trainer = _trainer(tiny_qwen3, tmp_path, {"matryoshka_dims": [64, 16], "doc_to_query_weight": 0.5})
    batch = trainer.data_collator(rows[:B])
    q, d = _embed(trainer, batch)
    g = 1 + N
    with torch.no_grad():
        got = trainer._loss(q, d, batch).loss
        expected = 0
        for k in (64, 16):
            qk, dk = truncate_normalize(q, k), truncate_normalize(d, k)
            expected = expected + info_nce_loss(qk, dk, group_size=g, doc_text_ids=batch["doc_text_ids"]).loss \
                + 0.5 * document_to_query_loss(qk, dk[::g], temperature=0.1, query_text_ids=batch["query_text_ids"],
                                               positive_text_ids=batch["doc_text_ids"][::g])
    torch.testing.assert_close(got, expected)
    _assert_grad_cache_agrees(trainer, batch)
