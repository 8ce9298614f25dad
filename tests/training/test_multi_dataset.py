"""Several datasets in one run (issue 16, item 5: ``data.train_files``): every step's rows come from one dataset
(brute force over whole epochs, in one process and on 2 simulated ranks dealt out by accelerate's own
``BatchSamplerShard``), block counts follow the weights (by hand), each row's query gets its dataset's
instruction (the tokenizer run by hand on ``format_instruction``), config errors name the field, and a short run
exports every instruction as a named prompt that sentence-transformers applies like hfemb."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hfemb.data.formats import read_records
from hfemb.errors import ConfigError
from hfemb.modeling.loading import format_instruction
from hfemb.training.config import config_from_dict, train_file_specs
from hfemb.training.sampling import SameDatasetSampler, dataset_block_counts


def _datasets(sizes: list[int], queries_per_dataset: list[int]) -> tuple[list[int], list[str]]:
    """Row -> dataset index and row -> query text (rows of one query are siblings)."""
    datasets, queries = [], []
    for d, (n, nq) in enumerate(zip(sizes, queries_per_dataset)):
        datasets += [d] * n
        queries += [f"d{d}-q{i % nq}" for i in range(n)]
    return datasets, queries


# ---- the sampler --------------------------------------------------------------------------------
def test_block_counts_follow_the_weights_by_hand():
    # block 4: 40 rows -> 10; weight 2 on 13 rows -> 6.5 -> 7 (half rounds up); 0.5 * 9 / 4 = 1.125 -> 1;
    # 1 row -> at least one block; 0.25 * 6 / 4 = 0.375 -> still one block
    assert dataset_block_counts([40, 13, 9, 1, 6], [1, 2, 0.5, 1, 0.25], 4) == [10, 7, 1, 1, 1]
    assert dataset_block_counts([18, 18], [1.0, 2.0], 4) == [5, 9]  # 4.5 -> 5


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_block_holds_one_dataset_with_distinct_queries(seed):
    datasets, queries = _datasets([40, 13, 22], [40, 13, 5])  # dataset 2: 22 rows of 5 queries (siblings)
    weights = [1.0, 2.0, 0.5]
    sampler = SameDatasetSampler(datasets, block_size=4, weights=weights, seed=seed, queries=queries)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == 4 * (10 + 7 + 3)  # 22 * 0.5 / 4 = 2.75 -> 3
        blocks = [order[i:i + 4] for i in range(0, len(order), 4)]
        owners = [{datasets[i] for i in b} for b in blocks]
        assert all(len(o) == 1 for o in owners)  # brute force: one dataset per block
        assert Counter(next(iter(o)) for o in owners) == {0: 10, 1: 7, 2: 3}  # exactly per the weights
        assert all(len({queries[i] for i in b}) == 4 for b in blocks)  # no two rows of one query in a step
        # weight 1 on 40 rows of 40 queries = 10 blocks: every row of dataset 0 exactly once
        assert sorted(i for i in order if datasets[i] == 0) == list(range(40))
        # weight 2 on 13 rows: 28 rows from successive shuffles (every row seen, none more than 3 times)
        counts = Counter(i for i in order if datasets[i] == 1)
        assert set(counts) == set(range(40, 53)) and sum(counts.values()) == 28 and max(counts.values()) <= 3


def test_sampler_is_seeded_per_epoch_and_resumable():
    datasets, queries = _datasets([30, 17], [30, 17])
    a = SameDatasetSampler(datasets, block_size=4, weights=[1, 1], seed=5, queries=queries)
    first, second = list(a), list(a)  # two epochs
    assert first != second
    b = SameDatasetSampler(datasets, block_size=4, weights=[1, 1], seed=5, queries=queries)
    b.set_epoch(1)  # what the Trainer does when it resumes in epoch 1
    assert list(b) == second
    b.set_epoch(0)
    assert list(b) == first
    c = SameDatasetSampler(datasets, block_size=4, weights=[1, 1], seed=6, queries=queries)
    assert list(c) != first


def test_random_batch_sampler_keeps_datasets_apart_but_not_queries():
    datasets, queries = _datasets([12, 12], [2, 2])  # 2 queries per dataset: a block of 4 must repeat one
    sampler = SameDatasetSampler(datasets, block_size=4, weights=[1, 1], seed=0, queries=queries)
    blocks = [b for _, b in sampler.blocks(0)]
    assert all(len({datasets[i] for i in b}) == 1 for b in blocks) and len(blocks) == 6
    plain = SameDatasetSampler(datasets, block_size=4, weights=[1, 1], seed=0, queries=None)
    assert sorted(i for _, b in plain.blocks(0) for i in b) == list(range(24))  # one shuffle each: every row once


@pytest.mark.parametrize("per_device", [2, 3])
def test_two_ranks_draw_the_same_dataset_at_every_step(per_device):
    """accelerate deals the Trainer's batches to the processes (BatchSamplerShard, as in DDP): at each step both
    ranks hold rows of one dataset, and the step's queries are distinct across the ranks."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    world = 2
    datasets, queries = _datasets([50, 21, 16], [50, 21, 8])
    sampler = SameDatasetSampler(datasets, block_size=per_device * world, weights=[1, 1.5, 1], seed=3,
                                 queries=queries)
    per_rank = []
    for rank in range(world):
        sampler.set_epoch(2)
        shard = BatchSamplerShard(BatchSampler(sampler, per_device, drop_last=False), num_processes=world,
                                  process_index=rank, split_batches=False, even_batches=True)
        per_rank.append(list(shard))
    assert len(per_rank[0]) == len(per_rank[1]) == sum(sampler.counts)
    for step, (b0, b1) in enumerate(zip(*per_rank)):
        assert len(b0) == len(b1) == per_device
        assert len({datasets[i] for i in b0 + b1}) == 1, f"step {step} mixes datasets"
        assert len({queries[i] for i in b0 + b1}) == 2 * per_device, f"step {step} repeats a query"


# ---- the trainer's dataloader and the collator --------------------------------------------------
def _tagged_rows(records, dataset: int, prompt: str | None, negatives: list[str]) -> list[dict]:
    return [{"query": r.query, "positive": r.positives[0], "negatives": negatives, "dataset": dataset,
             "query_prompt": prompt} for r in records]


def test_trainer_dataloader_batches_hold_one_dataset(tiny_qwen3, zh_sample_csv, tmp_path):
    from hfemb.training.trainer import MultiNegEmbeddingTrainer
    from hfemb.training.arguments import EmbeddingTrainingArguments
    from hfemb.modeling.loading import load_embedding_model

    recs = read_records(str(zh_sample_csv)).records[:30]
    rows = _tagged_rows(recs[:18], 0, "", ["x"]) + _tagged_rows(recs[18:], 1, None, ["y"])
    args = EmbeddingTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none",
                                      remove_unused_columns=False, seed=4, dataloader_pin_memory=False)
    trainer = MultiNegEmbeddingTrainer(model=load_embedding_model(tiny_qwen3), args=args, train_dataset=rows,
                                       data_collator=lambda features: features, dataset_weights=[1.0, 3.0])
    batches = list(trainer.get_train_dataloader())
    assert all(len({r["dataset"] for r in b}) == 1 and len({r["query"] for r in b}) == 3 for b in batches)
    assert Counter(b[0]["dataset"] for b in batches) == {0: 6, 1: 12}  # 18/3 = 6; 3 * 12/3 = 12


def test_collator_applies_each_rows_own_instruction(tiny_qwen3, zh_sample_csv):
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.collator import MultiNegCollator

    model = load_embedding_model(tiny_qwen3)  # its own query prompt: Qwen3's web-search instruction
    recs = read_records(str(zh_sample_csv)).records[:3]
    task = "Given a medical question, retrieve the answer"
    prompts = [format_instruction(task, ""), "", None]
    rows = [{"query": r.query, "positive": r.positives[0], "negatives": ["n"], "query_prompt": p}
            for r, p in zip(recs, prompts)]
    batch = MultiNegCollator(model=model, query_max_len=64, passage_max_len=32, num_negatives=1)(rows)
    expected_texts = [format_instruction(task, recs[0].query), recs[1].query, model.query_prompt + recs[2].query]
    assert model.query_prompt.startswith("Instruct: ") and not model.append_eos  # the tokenizer appends the end
    for i, text in enumerate(expected_texts):
        by_hand = model.tokenizer(text, truncation=True, max_length=64)["input_ids"]
        ids = batch["query_input_ids"][i][batch["query_attention_mask"][i].bool()].tolist()
        assert ids == by_hand
    # documents keep the model's document prompt (none) unless the model is symmetric
    docs = batch["doc_input_ids"][0][batch["doc_attention_mask"][0].bool()].tolist()
    assert docs == model.tokenizer(recs[0].positives[0], truncation=True, max_length=32)["input_ids"]
    sym = MultiNegCollator(model=model, query_max_len=64, passage_max_len=64, num_negatives=1, symmetric=True)(rows)
    for row in range(3):
        for k, text in enumerate((rows[row]["positive"], "n")):
            j = 2 * row + k
            ids = sym["doc_input_ids"][j][sym["doc_attention_mask"][j].bool()].tolist()
            prompt = prompts[row] if prompts[row] is not None else model.document_prompt
            assert ids == model.tokenizer(prompt + text, truncation=True, max_length=64)["input_ids"]
    # rows without a prompt key: exactly the former batches
    plain = [{k: v for k, v in r.items() if k != "query_prompt"} for r in rows]
    old = MultiNegCollator(model=model, query_max_len=64, passage_max_len=32, num_negatives=1)(plain)
    assert torch.equal(old["query_input_ids"], model.tokenize([r.query for r in recs], is_query=True,
                                                              max_length=64)["input_ids"])


# ---- configuration --------------------------------------------------------------------------------
BASE = {"model": {"name_or_path": "m"}, "training": {"output_dir": "o"}}


def _cfg(data: dict, training: dict | None = None):
    return config_from_dict({**BASE, "data": data, "training": {"output_dir": "o", **(training or {})}}, where="c.json")


def test_train_files_entries_are_normalised():
    cfg = _cfg({"train_files": [{"file": "a/med.jsonl.gz", "instruction": "Find the answer"},
                                {"file": "b/law.csv", "name": "law", "format": "csv", "weight": 2, "instruction": False},
                                {"file": "c/x.tsv", "instruction": ""}]})
    specs = train_file_specs(cfg.data)
    assert [(s.name, s.format, s.weight, s.instruction) for s in specs] == [
        ("med", None, 1.0, "Find the answer"), ("law", "csv", 2.0, False), ("x", None, 1.0, "")]
    assert json.loads(json.dumps(cfg.to_dict()))["data"]["train_files"][0]["name"] == "med"
    single = train_file_specs(_cfg({"train_file": "t.jsonl", "format": "pairs"}).data)
    assert [(s.file, s.name, s.format, s.instruction) for s in single] == [("t.jsonl", None, "pairs", None)]


@pytest.mark.parametrize("data, training, message", [
    ({"train_file": "t", "train_files": [{"file": "a"}]}, None, "give 'data.train_file' or 'data.train_files', not both"),
    ({}, None, "'data.train_file' is required"),
    ({"train_files": []}, None, "'data.train_files' must be a non-empty list"),
    ({"train_files": [{"file": "a"}, "b.jsonl"]}, None, "'data.train_files[1]' must be an object"),
    ({"train_files": [{"file": "a"}, {"file": "b"}, {"file": "c", "weight": 0}]}, None,
     "'data.train_files[2].weight' must be a finite number > 0, got 0.0"),
    ({"train_files": [{"file": "a", "weight": float("inf")}]}, None, "'data.train_files[0].weight' must be a finite"),
    ({"train_files": [{"file": "a"}]}, {"train_sampling_strategy": "group_by_length"}, "'training.group_by_length'"),
    ({"train_files": [{"file": "a"}, {"file": "b", "weight": "2"}]}, None,
     "'data.train_files[1].weight' must be a number, got '2'"),
    ({"train_files": [{"file": "a", "instruction": True}]}, None, "'data.train_files[0].instruction' must be"),
    ({"train_files": [{"file": "a", "prompt": "x"}]}, None, "unknown key(s) 'prompt' in section 'data.train_files[0]'"),
    ({"train_files": [{"name": "x"}]}, None, "'data.train_files[0].file' is required"),
    ({"train_files": [{"file": "a/train.jsonl"}, {"file": "b/train.jsonl"}]}, None,
     "'data.train_files[1].name' 'train' is also the name of 'data.train_files[0]'"),
    ({"train_files": [{"file": "a", "name": "query"}]}, None, "'data.train_files[0].name' must not be 'query'"),
    ({"train_files": [{"file": "a", "name": "a b"}]}, None, "'data.train_files[0].name' 'a b': use letters"),
    ({"train_files": [{"file": "a"}]}, {"group_by_length": True}, "'training.group_by_length' does not work with"),
])
def test_config_errors_name_the_field(data, training, message):
    with pytest.raises(ConfigError) as err:
        _cfg(data, training)
    assert message in str(err.value) and str(err.value).startswith("c.json: ")


def test_example_config_loads_and_its_files_are_shipped():
    from hfemb.training.config import load_config

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "multi_dataset.json")
    specs = train_file_specs(cfg.data)
    assert len(specs) == 2 and len({s.name for s in specs}) == 2
    assert all((repo / s.file).is_file() and "hfemb/resources/" in s.file for s in specs)
    assert all(isinstance(s.instruction, str) and s.instruction for s in specs)


# ---- end to end -----------------------------------------------------------------------------------
def _mined_files(recs, folder: Path, per_file: int) -> list[str]:
    """Two FlagEmbedding-style files of ``per_file`` records each, 2 negatives per row (other rows' answers)."""
    files = []
    for part in range(2):
        chunk = recs[part * per_file:(part + 1) * per_file]
        path = folder / f"part{part}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i, r in enumerate(chunk):
                negs = [chunk[(i + 5) % per_file].positives[0], chunk[(i + 7) % per_file].positives[0]]
                fh.write(json.dumps({"query": r.query, "pos": [r.positives[0]], "neg": negs}, ensure_ascii=False) + "\n")
        files.append(str(path))
    return files


def test_symmetric_with_different_instructions_is_refused():
    files = [{"file": "a", "instruction": "Find a similar question"}, {"file": "b", "instruction": "Find a duplicate"}]
    with pytest.raises(ConfigError, match="'model.symmetric' with 'data.train_files' of different instructions"):
        config_from_dict({"model": {"name_or_path": "m", "symmetric": True}, "data": {"train_files": files},
                          "training": {"output_dir": "o"}}, where="c.json")
    same = [{**f, "instruction": "Find a similar question"} for f in files]
    assert config_from_dict({"model": {"name_or_path": "m", "symmetric": True}, "data": {"train_files": same},
                             "training": {"output_dir": "o"}}).model.symmetric


def test_teacher_scores_in_some_datasets_only_are_refused(zh_sample_csv, tmp_path):
    """Held-out batches mix datasets: teacher scores must be in every dataset or in none (one error, both files)."""
    from hfemb.training.data_rows import load_train_datasets

    recs = read_records(str(zh_sample_csv)).records
    files = _mined_files(recs, tmp_path, 10)
    with open(files[0], encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    with open(files[0], "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({**row, "pos_scores": [0.9], "neg_scores": [0.2, 0.1]}, ensure_ascii=False) + "\n")
    cfg = _cfg({"train_files": [{"file": f} for f in files], "num_negatives": 2, "mine": False, "eval_ratio": 0.2})
    with pytest.raises(ConfigError, match=r"teacher scores .* in .*part0.jsonl but not in .*part1.jsonl"):
        load_train_datasets(cfg, tmp_path / "cache", {}, seed=0)


def test_resumed_multi_dataset_run_equals_the_uninterrupted_one(tiny_qwen3, zh_sample_csv, tmp_path):
    """Killed after step 2 of a 9-step epoch (3 + 6 blocks) and resumed: the Trainer skips the epoch's first
    batches of the same seeded order, so the adapter equals the uninterrupted run's."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import assert_resume_equals_uninterrupted

    files = _mined_files(read_records(str(zh_sample_csv)).records[:24], tmp_path, 12)

    def cfg(out, steps):
        return config_from_dict({
            "model": {"name_or_path": tiny_qwen3, "finetune_type": "lora", "torch_dtype": "float32"},
            "data": {"train_files": [{"file": files[0], "instruction": "Answer it"},
                                     {"file": files[1], "instruction": False, "weight": 2}],
                     "query_max_len": 32, "passage_max_len": 32, "num_negatives": 2},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": steps,
                         "learning_rate": 1e-3, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                         "logging_steps": 1, "report_to": "none", "save_strategy": "steps", "save_steps": 2,
                         "save_total_limit": 3, "seed": 0, "dataloader_pin_memory": False, "disable_tqdm": True}})

    assert_resume_equals_uninterrupted(cfg, tmp_path)


def test_run_with_two_datasets_exports_each_instruction_as_a_named_prompt(tiny_qwen3, zh_sample_csv, tmp_path):
    from sentence_transformers import SentenceTransformer

    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.runner import run_training

    recs = read_records(str(zh_sample_csv)).records[:48]
    files = _mined_files(recs, tmp_path, 24)
    tasks = {"symptoms": "Given a patient's question, retrieve the doctor's answer",
             "diet": "Given a question about diet, retrieve the advice"}
    out = tmp_path / "run"
    cfg = config_from_dict({
        "model": {"name_or_path": tiny_qwen3, "finetune_type": "lora", "torch_dtype": "float32"},
        "data": {"train_files": [{"file": files[0], "name": "symptoms", "instruction": tasks["symptoms"]},
                                 {"file": files[1], "name": "diet", "instruction": tasks["diet"], "weight": 2}],
                 "eval_ratio": 0.25, "query_max_len": 48, "passage_max_len": 48, "num_negatives": 2,
                 "embedding_eval": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                     "num_train_epochs": 1, "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none",
                     "save_strategy": "no", "eval_strategy": "no", "seed": 0, "dataloader_pin_memory": False,
                     "disable_tqdm": True}})
    summary = run_training(cfg)
    data = summary["data"]
    # the eval split is per dataset: 6 of each file's 24 queries held out
    assert data["train symptoms"]["rows_after_eval_split"] == 18 == data["train diet"]["rows_after_eval_split"]
    assert data["eval"]["rows"] == 12
    assert summary["global_step"] == 5 + 9  # round(18/4) = 5 (half up); 2 * 18 / 4 = 9
    base = load_embedding_model(tiny_qwen3)
    st_config = json.loads((out / "merged" / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": base.query_prompt, "symptoms": format_instruction(tasks["symptoms"], ""),
                                    "diet": format_instruction(tasks["diet"], ""), "document": ""}
    for folder in ("adapter", "merged"):  # hfemb reads them back
        assert load_embedding_model(str(out / folder)).named_prompts == {k: st_config["prompts"][k]
                                                                          for k in ("symptoms", "diet")}
    queries = [recs[0].query, recs[30].query, "What should I eat with high blood pressure?"]
    st = SentenceTransformer(str(out / "merged"), device="cpu")
    for name, task in tasks.items():
        ours = load_embedding_model(str(out / "merged"), query_instruction=task).encode(queries, is_query=True)
        np.testing.assert_allclose(st.encode(queries, prompt_name=name), ours, atol=1e-5)
    plain = load_embedding_model(str(out / "merged")).encode(queries, is_query=True)
    assert np.abs(st.encode(queries, prompt_name="diet") - plain).max() > 1e-3  # the instruction matters
    from hfemb.publishing.model_card import build_model_card

    card = build_model_card(out / "merged").text  # the card lists every named prompt, as saved
    for name in tasks:
        assert f"prompt `{name}` (`prompt_name='{name}'`) | `{json.dumps(st_config['prompts'][name])}`" in card


def test_model_card_config_keeps_only_the_file_names_of_train_files():
    from hfemb.publishing.card_sections import clean_config

    config = {"data": {"train_files": [{"file": "/home/alice/private/med.csv", "name": "med", "weight": 2.0}]}}
    assert clean_config(config) == {"data": {"train_files": [{"file": "med.csv", "name": "med", "weight": 2.0}]}}


def test_hold_out_evaluator_encodes_each_query_with_its_datasets_prompt(tiny_qwen3, zh_sample_csv):
    """The eval_ratio hold-out of several datasets: metrics equal the scoring of queries encoded by hand with
    their own prompt written in front (the tiny model's document prompt is empty)."""
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.evaluator import build_evaluators

    model = load_embedding_model(tiny_qwen3)
    recs = read_records(str(zh_sample_csv)).records[:12]
    prompts = [format_instruction("Retrieve the answer", ""), "", None]
    rows = [{"query": r.query, "positive": r.positives[0], "negatives": [recs[(i + 3) % 12].positives[0]],
             "dataset": i % 3, "query_prompt": prompts[i % 3]} for i, r in enumerate(recs)]
    cfg = config_from_dict({**BASE, "data": {"train_files": [{"file": "a"}], "eval_ratio": 0.2,
                                             "query_max_len": 64, "passage_max_len": 64}})
    (ev,) = build_evaluators(cfg, rows)
    queries, documents = ev.texts()
    by_hand = [(prompts[i % 3] if prompts[i % 3] is not None else model.query_prompt) + r.query
               for i, r in enumerate(recs)]
    assert model.document_prompt == "" and queries == [r.query for r in recs]
    q = model.encode(by_hand, is_query=False, max_length=64)
    d = model.encode(documents, is_query=False, max_length=64)
    assert ev(model) == pytest.approx(ev.score(q, d), abs=1e-6)
    plain = model.encode(queries, is_query=True, max_length=64)  # the model's own prompt on every query
    assert ev.score(plain, d) != pytest.approx(ev.score(q, d), abs=1e-6)


# ---- a real 2-process DDP dataloader (torchrun, gloo on CPU) ------------------------------------------
PER_DEVICE = 3


def _ddp_rows() -> list[dict]:
    return ([{"query": f"first q{i}", "positive": "p", "negatives": ["n"], "dataset": 0} for i in range(18)]
            + [{"query": f"second q{i}", "positive": "p", "negatives": ["n"], "dataset": 1} for i in range(10)])


def _torchrun_dataloader_main(model_path: str, out: str) -> None:
    """Each process: the Trainer's own (accelerate-sharded) train dataloader over two epochs; the row indices
    of every batch go to ``out/rank<r>.json``."""
    from hfemb.modeling.loading import load_embedding_model
    from hfemb.training.arguments import EmbeddingTrainingArguments
    from hfemb.training.distributed import rank, world_size
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    rows = [{**r, "index": i} for i, r in enumerate(_ddp_rows())]
    args = EmbeddingTrainingArguments(output_dir=out, per_device_train_batch_size=PER_DEVICE, use_cpu=True,
                                      report_to="none", remove_unused_columns=False, seed=4,
                                      dataloader_pin_memory=False, ddp_broadcast_buffers=False)
    trainer = MultiNegEmbeddingTrainer(model=load_embedding_model(model_path), args=args, train_dataset=rows,
                                       data_collator=lambda features: [f["index"] for f in features],
                                       dataset_weights=[1.0, 2.0])
    loader = trainer.get_train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)  # as Trainer's loop does
        epochs.append([list(batch) for batch in loader])
    Path(out, f"rank{rank()}.json").write_text(json.dumps({"world_size": world_size(), "epochs": epochs}))


def test_two_ddp_processes_draw_the_same_dataset_at_every_step(tiny_qwen3, tmp_path):
    from hfemb.testing.torchrun import run_torchrun

    run_torchrun(__file__, tiny_qwen3, tmp_path, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    rows = _ddp_rows()
    oracle = SameDatasetSampler([r["dataset"] for r in rows], block_size=2 * PER_DEVICE, weights=[1.0, 2.0], seed=4,
                                queries=[r["query"] for r in rows])
    for epoch in range(2):
        steps = list(zip(ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]))
        assert len(steps) == 3 + 3  # round(18 / 6) = 3; 2 * 10 / 6 = 3.3 -> 3
        for b0, b1 in steps:
            assert len(b0) == len(b1) == PER_DEVICE
            assert len({rows[i]["dataset"] for i in b0 + b1}) == 1  # one dataset on both processes
            assert len({rows[i]["query"] for i in b0 + b1}) == 2 * PER_DEVICE
        assert Counter(rows[b0[0]]["dataset"] for b0, _ in steps) == {0: 3, 1: 3}
        # and it is the sampler's own order, dealt out batch by batch to the processes
        assert [b0 + b1 for b0, b1 in steps] == [block for _, block in oracle.blocks(epoch)]
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]


if __name__ == "__main__":  # run by torchrun from test_two_ddp_processes_draw_the_same_dataset_at_every_step
    _torchrun_dataloader_main(*sys.argv[1:3])
