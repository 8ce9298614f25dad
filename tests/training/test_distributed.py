"""Cross-device negatives: the loss with gathered documents (``doc_offset``) by hand, and real 2-process
gloo runs of the Trainer (DDP on CPU) against one process on the concatenated batch: same loss, same
parameter gradients, false negatives masked across processes, GradCache under DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hfemb.testing.torchrun import run_torchrun
from hfemb.training.loss import MASKED_LOGIT, info_nce_loss


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- the loss with gathered documents ------------------------------------------------------------
def test_doc_offset_rows_equal_the_single_process_loss():
    """2 'processes' x (B=2 queries, G=3 documents each): each process's logits are its rows of the
    single-process logits on the concatenated batch, labels offset by rank*B*G, and the mean of the two
    losses is the single-process loss."""
    b, g, w = 2, 3, 2
    q, d = _unit(w * b, 8, seed=1), _unit(w * b * g, 8, seed=2)
    full = info_nce_loss(q, d, group_size=g, temperature=0.05)
    parts = []
    for r in range(w):
        out = info_nce_loss(q[r * b:(r + 1) * b], d, group_size=g, temperature=0.05, doc_offset=r * b * g)
        assert out.labels.tolist() == [r * b * g, r * b * g + g]
        torch.testing.assert_close(out.logits, full.logits[r * b:(r + 1) * b])
        parts.append(out.loss)
    torch.testing.assert_close(torch.stack(parts).mean(), full.loss)
    # by hand for query 3 (process 1, second query): positive = document 3*G = 9
    logits = q[3] @ d.T / 0.05
    torch.testing.assert_close(parts[1] * 2 - F.cross_entropy(logits[None], torch.tensor([9])),
                               F.cross_entropy((q[2] @ d.T / 0.05)[None], torch.tensor([6])))


def test_doc_offset_masks_a_duplicate_of_the_positive_held_by_another_process():
    b, g = 1, 2
    q, d = _unit(2, 4, seed=3), _unit(4, 4, seed=4)
    ids = torch.tensor([10, 11, 20, 10])  # process 1's negative (row 3) has the text of process 0's positive
    out = info_nce_loss(q[:1], d, group_size=g, mask_false_negatives=True, false_negative_margin=10.0,
                        doc_text_ids=ids, doc_offset=0)
    assert out.mask.tolist() == [[False, False, False, True]] and out.logits[0, 3] == MASKED_LOGIT
    other = info_nce_loss(q[1:], d, group_size=g, mask_false_negatives=True, false_negative_margin=10.0,
                          doc_text_ids=ids, doc_offset=2)
    assert other.mask.tolist() == [[False, False, False, False]] and other.labels.tolist() == [2]
    expected = F.cross_entropy((q[0] @ d[:3].T / 0.1)[None], torch.tensor([0]))
    torch.testing.assert_close(out.loss, expected)


def test_doc_offset_is_checked():
    q, d = _unit(2, 4), _unit(4, 4)
    with pytest.raises(ValueError, match="rows 2..5"):
        info_nce_loss(q, d, group_size=2, doc_offset=2)
    with pytest.raises(ValueError, match="in_batch_negatives"):
        info_nce_loss(q, d, group_size=2, doc_offset=0, in_batch_negatives=False)


def test_gather_rows_single_process_is_the_identity():
    from hfemb.training.distributed import gather_rows, is_distributed, rank, world_size

    t = torch.randn(3, 2, requires_grad=True)
    out, offset = gather_rows(t)
    assert out is t and offset == 0 and not is_distributed() and world_size() == 1 and rank() == 0


def test_doc_text_ids_identify_texts_across_batches(tiny_qwen3):
    """The collator's ids are a hash of the text (not a per-batch counter): a text has the same id in any
    batch or process, so a duplicate held by another process is recognised."""
    import hashlib

    from hfemb.training.collator import MultiNegCollator, text_id
    from hfemb.modeling.loading import load_embedding_model

    collate = MultiNegCollator(load_embedding_model(tiny_qwen3), num_negatives=1)
    a = collate([{"query": "q1", "positive": "高血压", "negatives": ["糖尿病"]}])["doc_text_ids"]
    b = collate([{"query": "q2", "positive": "头痛", "negatives": ["x"]},
                 {"query": "q3", "positive": "糖尿病", "negatives": ["高血压"]}])["doc_text_ids"]
    assert a.tolist() == [b[3].item(), b[2].item()] and len(set(b.tolist())) == 4
    expected = int.from_bytes(hashlib.blake2b("高血压".encode(), digest_size=8).digest(), "little") & (2**63 - 1)
    assert text_id("高血压") == expected == a[0].item() >= 0


# ---- 2 gloo processes (torchrun) vs one process on the concatenated batch --------------------------
B, N = 2, 2  # per process: 2 queries, 1 positive + 2 negatives each


def ddp_rows(zh_sample_csv) -> list[dict]:
    """4 rows (2 per process); row 2 (process 1) has row 0's positive as a negative: a false negative
    that only the gathered documents reveal to process 0."""
    from hfemb.data.formats import read_records

    recs = read_records(str(zh_sample_csv)).records[:12]
    rows = [{"query": r.query, "positive": r.positives[0],
             "negatives": [recs[i + 4].positives[0], recs[i + 8].positives[0]]} for i, r in enumerate(recs[:4])]
    rows[2]["negatives"][0] = rows[0]["positive"]
    return rows


SCENARIOS = {  # name -> (loss section, extra training keys)
    "cross_device": ({"mask_false_negatives": True, "false_negative_margin": 10.0}, {}),
    "grad_cache": ({"mask_false_negatives": True, "false_negative_margin": 10.0}, {"grad_cache_mini_batch": 2}),
    "local_only": ({"cross_device_negatives": False}, {}),
    # + the document -> query term: each positive against every process's queries (gathered with gradients)
    "doc_to_query": ({"doc_to_query_weight": 1.0}, {}),
    "doc_to_query_grad_cache": ({"doc_to_query_weight": 1.0}, {"grad_cache_mini_batch": 2}),
}


def one_step(model_path: str, rows: list[dict], out: str, batch_size: int, loss: dict, training: dict) -> dict:
    """One SGD step of full fine-tuning through MultiNegEmbeddingTrainer; returns the (all-reduced) parameter
    gradients before the optimizer step, the logged loss and accuracy, and how many logits were masked."""
    from transformers import TrainerCallback

    from hfemb.training.collator import MultiNegCollator
    from hfemb.training.config import config_from_dict
    from hfemb.training.run_setup import build_model, training_arguments
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    cfg = config_from_dict({
        "model": {"name_or_path": model_path, "finetune_type": "full", "torch_dtype": "float32"},
        "data": {"train_file": "unused.jsonl", "num_negatives": N}, "loss": loss,
        "training": {"output_dir": out, "report_to": "none", "save_strategy": "no", "seed": 0, "max_steps": 1,
                     "per_device_train_batch_size": batch_size, "optim": "sgd", "learning_rate": 0.1,
                     "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0,
                     "logging_steps": 1, "disable_tqdm": True, "dataloader_pin_memory": False, **training},
    })
    captured: dict = {"masked": 0}

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    model = build_model(cfg)
    trainer = MultiNegEmbeddingTrainer(
        model=model, args=training_arguments(cfg, has_eval=False), train_dataset=rows, loss_config=cfg.loss,
        data_collator=MultiNegCollator(model, query_max_len=32, passage_max_len=48, num_negatives=N),
        grad_cache_mini_batch=cfg.training.get("grad_cache_mini_batch"), callbacks=[Grads()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    loss_fn = trainer._loss

    def counting_loss(q, d, inputs):
        result = loss_fn(q, d, inputs)
        captured["masked"] += result.num_masked
        captured["candidates"] = result.logits.shape[1]
        return result

    trainer._loss = counting_loss
    training_step = trainer.training_step

    def recording_step(model, inputs, *args):
        captured["wrapper"] = type(model).__name__
        return training_step(model, inputs, *args)

    trainer.training_step = recording_step
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    captured.update(loss=logged["loss"], accuracy=logged["accuracy"])
    return captured


def _torchrun_main(model_path: str, rows_file: str, out: str) -> None:
    """Entry point of each torchrun process: the scenarios, then the real CLI (`run_train.py CONFIG`) on each
    config of runs.json (plain DDP first, then DeepSpeed)."""
    from hfemb.cli import main
    from hfemb.training.distributed import rank, world_size

    rows = json.loads(Path(rows_file).read_text(encoding="utf-8"))
    results = {name: one_step(model_path, rows, f"{out}/{name}", B, loss, training)
               for name, (loss, training) in SCENARIOS.items()}
    results["world_size"] = world_size()
    torch.save(results, f"{out}/rank{rank()}.pt")
    for run in json.loads(Path(out, "runs.json").read_text()):
        assert main(["train", f"{out}/{run}.json"]) == 0


def _deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


REPO = Path(__file__).resolve().parents[2]
HAS_DEEPSPEED = _deepspeed_importable()


@pytest.fixture(scope="module")
def torchrun_results(tiny_qwen3, zh_sample_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    rows = ddp_rows(zh_sample_csv)
    (out / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    train_rows = [{"query": r["query"], "positive": r["positive"], "negative": r["negatives"]} for r in rows * 2]
    (out / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_rows),
                                     encoding="utf-8")
    (out / "mixed.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mixed_rows()),
                                     encoding="utf-8")
    runs = ["ddp_lora", "ddp_full"] + (["zero3_lora", "zero3_full", "zero2_lora", "zero3_mixed"] if HAS_DEEPSPEED else [])
    for run in runs:
        engine, finetune = run.split("_")
        train_file, passage_max_len = out / "train.jsonl", 48
        if finetune == "mixed":  # issue 13: lengths that differ per process (every 4th positive ~600 characters)
            finetune, train_file, passage_max_len = "lora", out / "mixed.jsonl", 1024
        training = {"output_dir": str(out / run), "per_device_train_batch_size": B, "num_train_epochs": 1,
                    "learning_rate": 1e-3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                    "report_to": "none", "logging_steps": 1, "disable_tqdm": True, "save_strategy": "no"}
        if engine != "ddp":
            training["deepspeed"] = str(REPO / "configs" / "deepspeed" / f"{engine}.json")
        if run == "zero3_lora":  # a checkpoint too: MultiNegEmbeddingTrainer._save with gathered weights
            training.update(save_strategy="steps", save_steps=2)
        (out / f"{run}.json").write_text(json.dumps({
            "model": {"name_or_path": tiny_qwen3, "torch_dtype": "float32", "finetune_type": finetune},
            "data": {"train_file": str(train_file), "num_negatives": N, "query_max_len": 32,
                     "passage_max_len": passage_max_len},
            "lora": {"r": 4, "alpha": 8}, "training": training}), encoding="utf-8")
    (out / "runs.json").write_text(json.dumps(runs))
    run_torchrun(__file__, tiny_qwen3, out / "rows.json", out)
    return out, rows, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_processes_equal_one_process_on_the_whole_batch(torchrun_results, tiny_qwen3, tmp_path):
    """Same loss and same parameter gradients (to 1e-5) as one process on the 4 rows; the duplicate of
    process 0's positive held by process 1 is masked; GradCache under DDP gives the same again."""
    _, rows, ranks = torchrun_results
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["cross_device"]["wrapper"] == "DistributedDataParallel"
    single = one_step(tiny_qwen3, rows, str(tmp_path / "single"), 2 * B, *SCENARIOS["cross_device"])
    assert single["masked"] == 1 and single["candidates"] == 2 * B * (1 + N)
    for name in ("cross_device", "grad_cache"):
        per_rank = [r[name] for r in ranks]
        assert [r["candidates"] for r in per_rank] == [2 * B * (1 + N)] * 2  # every process scores all 12 documents
        assert sum(r["masked"] for r in per_rank) == single["masked"]  # found by process 0 across processes
        assert per_rank[0]["loss"] == pytest.approx(single["loss"], abs=1e-5)  # the Trainer's mean over processes
        assert per_rank[0]["accuracy"] == single["accuracy"]
        for r in per_rank:
            assert r["grads"].keys() == single["grads"].keys()
            for param, grad in single["grads"].items():
                torch.testing.assert_close(r["grads"][param], grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {param}")
    moved = max(float(g.abs().max()) for g in single["grads"].values())
    assert moved > 1e-3


def test_document_to_query_term_across_processes_equals_one_process(torchrun_results, tiny_qwen3, tmp_path):
    """loss.doc_to_query_weight under DDP (and GradCache under DDP): the loss and gradients of one process on the
    whole batch, each positive scored against all 4 queries; and the term is on (a higher loss than without it)."""
    _, rows, ranks = torchrun_results
    single = one_step(tiny_qwen3, rows, str(tmp_path / "single"), 2 * B, *SCENARIOS["doc_to_query"])
    plain = one_step(tiny_qwen3, rows, str(tmp_path / "plain"), 2 * B, {}, {})
    assert single["loss"] > plain["loss"] + 0.1
    for name in ("doc_to_query", "doc_to_query_grad_cache"):
        per_rank = [r[name] for r in ranks]
        assert per_rank[0]["loss"] == pytest.approx(single["loss"], abs=1e-5)
        for r in per_rank:
            assert r["grads"].keys() == single["grads"].keys()
            for param, grad in single["grads"].items():
                torch.testing.assert_close(r["grads"][param], grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {param}")


def test_without_cross_device_negatives_each_process_sees_only_its_documents(torchrun_results, tiny_qwen3, tmp_path):
    """The control: with cross_device_negatives off, each process has 6 candidates and the gradient is not
    the whole-batch one (what the gather adds is real)."""
    _, rows, ranks = torchrun_results
    local = [r["local_only"] for r in ranks]
    assert [r["candidates"] for r in local] == [B * (1 + N)] * 2
    single = one_step(tiny_qwen3, rows, str(tmp_path / "single"), 2 * B, *SCENARIOS["cross_device"])
    diff = max(float((local[0]["grads"][n] - g).abs().max()) for n, g in single["grads"].items())
    assert diff > 1e-4


def mixed_rows() -> list[dict]:
    """16 rows whose every 4th positive is ~600 characters and the rest ~12: with 2 rows per process and step,
    the processes get different length mixes (length chunking would make them call the backbone a different
    number of times)."""
    rows = []
    for i in range(16):
        positive = (f"第{i}条长答案：" + "高血压患者应低盐饮食，规律运动，按时服药。" * 30)[:600] if i % 4 == 0 else f"短答案{i}：多喝水，早睡。"
        rows.append({"query": f"问题{i}：怎么办？", "positive": positive,
                     "negative": [f"无关{i}-{k}：天气很好。" for k in range(N)]})
    return rows


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_with_per_process_length_mixes_finishes(torchrun_results):
    """Issue 13 item 6: ZeRO-3 on rows of mixed lengths that differ per process finishes (it aborted with
    "Received data size doesn't match expected size" when length chunking gave the processes different
    numbers of backbone calls) and writes merged/."""
    out, _, _ = torchrun_results
    summary = json.loads((out / "zero3_mixed" / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    assert (out / "zero3_mixed" / "merged" / "model.safetensors").exists()
    assert (out / "zero3_mixed" / "adapter" / "adapter_model.safetensors").exists()


def test_torchrun_cli_training_writes_outputs_once(torchrun_results):
    """`run_train.py CONFIG` under torchrun: 8 rows, 2 per process and step -> 2 optimizer steps; rank 0
    writes the outputs and one log line per step."""
    out, _, _ = torchrun_results
    summary = json.loads((out / "ddp_lora" / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["parameters"]["total"] > summary["parameters"]["trainable"] > 0
    assert (out / "ddp_lora" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "ddp_lora" / "merged" / "model.safetensors").exists()
    log = [json.loads(line) for line in (out / "ddp_lora" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-5, rtol=1e-4, msg=f"{a} vs {b}: {key}")


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("engine", ["zero3", "zero2"])
def test_deepspeed_runs_save_the_same_model_as_ddp(torchrun_results, engine):
    """configs/deepspeed/zero{2,3}.json under torchrun (2 CPU processes, gloo; ZeRO-3 loads the model into
    shards with zero.Init): the adapter and the merged model hfemb writes -- from weights gathered from
    both processes under ZeRO-3 -- equal those of the plain DDP run with the same settings."""
    out, _, _ = torchrun_results
    for finetune in ("lora", "full") if engine == "zero3" else ("lora",):
        run, ddp = out / f"{engine}_{finetune}", out / f"ddp_{finetune}"
        summary = json.loads((run / "train_summary.json").read_text())
        reference = json.loads((ddp / "train_summary.json").read_text())
        assert summary["global_step"] == 2 and summary["parameters"] == reference["parameters"]
        assert summary["train"]["train_loss"] == pytest.approx(reference["train"]["train_loss"], abs=1e-4)
        if finetune == "lora":
            _assert_same_weights(run / "adapter", ddp / "adapter")
            assert not (run / "merged" / "adapter_config.json").exists()
        _assert_same_weights(run / "merged", ddp / "merged")
        assert not list(run.glob(".*gathered*"))
    if engine == "zero3":  # the step-2 checkpoint holds the gathered adapter, not empty shards
        _assert_same_weights(out / "zero3_lora" / "checkpoint-2", out / "ddp_lora" / "adapter")
        # issue 13 item 11: DeepSpeed's own checkpoint leaves out the frozen base (the embedding matrix alone
        # is 151k x 64 fp32 = 39 MB; the adapter and its optimizer states are a few hundred KB)
        engine_files = [f for f in (out / "zero3_lora" / "checkpoint-2").glob("global_step*/*") if f.is_file()]
        assert engine_files and sum(f.stat().st_size for f in engine_files) < 4_000_000


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_merged_model_encodes_like_its_adapter(torchrun_results, tiny_qwen3):
    import numpy as np

    from hfemb.modeling.loading import load_embedding_model

    out, _, _ = torchrun_results
    texts = ["高血压能吃党参吗？", "肝病患者的饮食"]
    adapter = load_embedding_model(str(out / "zero3_lora" / "adapter")).encode(texts, is_query=True)
    merged = load_embedding_model(str(out / "zero3_lora" / "merged")).encode(texts, is_query=True)
    base = load_embedding_model(tiny_qwen3).encode(texts, is_query=True)
    np.testing.assert_allclose(adapter, merged, atol=1e-5)
    assert np.abs(base - merged).max() > 1e-3  # trained


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_load_into_training_arguments(stage, tmp_path):
    from hfemb.training.config import config_from_dict
    from hfemb.training.run_setup import training_arguments

    cfg = config_from_dict({"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"},
                            "training": {"output_dir": str(tmp_path), "report_to": "none",
                                         "deepspeed": str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")}})
    args = training_arguments(cfg, has_eval=False)
    ds = args.hf_deepspeed_config
    assert ds.config["zero_optimization"]["stage"] == stage and ds.is_zero3() == (stage == 3)
    if stage == 3:
        assert ds.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # do not leave ZeRO-3 switched on for later tests in this process


if __name__ == "__main__":  # run by torchrun from the `torchrun_results` fixture
    import sys

    _torchrun_main(*sys.argv[1:4])
