"""EmbeddingModel / load_embedding_model against the official Qwen3-Embedding recipe, sentence-transformers
and hand-built tensors, on the tiny Qwen3 (real Qwen BPE) and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfemb.errors import ConfigError, HfembError
from hfemb.modeling.loading import QWEN3_WEB_SEARCH_TASK, format_instruction, load_embedding_model
from hfemb.modeling.model import EmbeddingModel, _length_batches
from hfemb.modeling.pooling import pool

ENDOFTEXT_ID = 151643
QUERIES = ["什么是高血压？", "how do I treat a common cold at home", "糖尿病患者能吃水果吗，有哪些需要注意的地方？孕妇呢？", "fever"]
DOCS = [
    "高血压是以体循环动脉血压增高为主要特征的临床综合征。",
    "Rest, drink fluids, and take paracetamol if needed.",
    "糖尿病患者可以适量吃低糖水果，如苹果、柚子，避免荔枝、榴莲等高糖水果。 Monitor blood glucose after eating.",
    "ok",
    "A much longer English passage about diabetes and fruit intake, which goes on and on for a while so that "
    "the batch needs a lot of padding on the shorter rows.",
]


@pytest.fixture(scope="module")
def tiny(tiny_qwen3):
    return load_embedding_model(tiny_qwen3)


def official_qwen3_embeddings(path: str, texts: list[str]) -> torch.Tensor:
    """The Qwen3-Embedding model card's transformers recipe, verbatim."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModel.from_pretrained(path).eval()

    def last_token_pool(last_hidden_states, attention_mask):
        left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
        if left_padding:
            return last_hidden_states[:, -1]
        sequence_lengths = attention_mask.sum(dim=1) - 1
        return last_hidden_states[torch.arange(last_hidden_states.shape[0]), sequence_lengths]

    batch = tokenizer(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(last_token_pool(model(**batch).last_hidden_state, batch["attention_mask"]), p=2, dim=1)


# ---- the official recipe promise -----------------------------------------------------------------
def test_tiny_qwen3_equals_official_recipe(tiny, tiny_qwen3):
    assert tiny.pooling == "last" and tiny.tokenizer.padding_side == "left"
    assert tiny.query_prompt == format_instruction(QWEN3_WEB_SEARCH_TASK, "") and tiny.document_prompt == ""
    assert not tiny.append_eos  # the Qwen3-Embedding tokenizer appends <|endoftext|> itself
    texts = [format_instruction(QWEN3_WEB_SEARCH_TASK, q) for q in QUERIES] + DOCS
    reference = official_qwen3_embeddings(tiny_qwen3, texts)
    for batch_size in (2, 32):  # different batch compositions and padding
        ours = np.concatenate([tiny.encode(QUERIES, is_query=True, batch_size=batch_size),
                               tiny.encode(DOCS, is_query=False, batch_size=batch_size)])
        np.testing.assert_allclose(ours, reference.numpy(), atol=1e-5)
    # the forward path used in training agrees too
    enc = tiny.tokenize(DOCS, is_query=False, max_length=8192)
    assert (enc["input_ids"][:, -1] == ENDOFTEXT_ID).all()
    with torch.no_grad():
        np.testing.assert_allclose(tiny(enc["input_ids"], enc["attention_mask"]).numpy(),
                                   reference[len(QUERIES):].numpy(), atol=1e-5)


def test_encode_restores_order_and_batches_by_tokens(tiny):
    one_by_one = np.stack([tiny.encode([t], is_query=False)[0] for t in DOCS])
    np.testing.assert_allclose(tiny.encode(DOCS, is_query=False, batch_size=3), one_by_one, atol=1e-5)
    np.testing.assert_allclose(tiny.encode(DOCS, is_query=False, max_tokens_per_batch=40), one_by_one, atol=1e-5)
    out = tiny.encode(DOCS, is_query=False, convert_to_numpy=False)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (len(DOCS), 64)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-6)
    assert tiny.encode([], is_query=True).shape == (0, 64)
    with pytest.raises(TypeError):
        tiny.encode("one string", is_query=True)
    with pytest.raises(TypeError, match="text 1"):
        tiny.encode(["ok", None], is_query=True)


def test_length_batches():
    lengths = [3, 10, 1, 7, 7]
    assert _length_batches(lengths, 2, None) == [[1, 3], [4, 0], [2]]
    # budget 19 padded tokens: [10] alone (2*10 > 19), then 7,7 (a third row would make 3*7 = 21), then 3,1
    assert _length_batches(lengths, 32, 19) == [[1], [3, 4], [0, 2]]
    assert _length_batches(lengths, 32, 20) == [[1, 3], [4, 0], [2]]  # 2*10 = 20 fits
    with pytest.raises(ConfigError):
        _length_batches(lengths, 0, None)


# ---- pooling ---------------------------------------------------------------------------------------
def test_pool_by_hand_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [B=2, T=4, H=3]
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").tolist() == [hidden[0, 1].tolist(), hidden[1, 3].tolist()]
    assert pool(hidden, left, "last").tolist() == [hidden[0, 3].tolist(), hidden[1, 3].tolist()]
    assert pool(hidden, right, "cls").tolist() == [hidden[0, 0].tolist(), hidden[1, 0].tolist()]
    assert pool(hidden, left, "cls").tolist() == [hidden[0, 2].tolist(), hidden[1, 0].tolist()]
    assert pool(hidden, right, "mean").tolist() == [hidden[0, :2].mean(0).tolist(), hidden[1].mean(0).tolist()]
    assert pool(hidden, left, "mean").tolist() == [hidden[0, 2:].mean(0).tolist(), hidden[1].mean(0).tolist()]
    assert pool(hidden.bfloat16(), left, "mean").dtype == torch.float32
    with pytest.raises(ConfigError):
        pool(hidden, left, "max")


def test_same_vector_whatever_the_padding(tiny):
    text = DOCS[3]  # the shortest text: heavily padded in a batch
    alone = tiny.encode([text], is_query=False)[0]
    in_batch = tiny.encode(DOCS, is_query=False)[3]
    np.testing.assert_allclose(in_batch, alone, atol=1e-5)
    try:
        tiny.tokenizer.padding_side = "right"  # a user-supplied right-padded tokenizer
        enc = tiny.tokenize(DOCS, is_query=False, max_length=512)
        assert enc["attention_mask"][3, 0] == 1 and enc["attention_mask"][3, -1] == 0
        right = tiny.encode(DOCS, is_query=False)
    finally:
        tiny.tokenizer.padding_side = "left"
    np.testing.assert_allclose(right[3], alone, atol=1e-5)
    np.testing.assert_allclose(right, tiny.encode(DOCS, is_query=False), atol=1e-5)


# ---- MiniLM: mean pooling, no prompt, equals sentence-transformers --------------------------------
def test_minilm_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    model = load_embedding_model(minilm)
    assert model.pooling == "mean" and model.tokenizer.padding_side == "right"
    assert model.query_prompt == "" and model.document_prompt == "" and not model.append_eos
    assert model.max_length == 256  # sentence_bert_config.json
    texts = [d for d in DOCS if d.isascii()] + ["how do I treat a common cold at home", "fever"]
    reference = SentenceTransformer(minilm, device="cpu").encode(texts)
    np.testing.assert_allclose(model.encode(texts, is_query=True, batch_size=2), reference, atol=1e-5)


# ---- Qwen3 checkpoint layouts ----------------------------------------------------------------------
def _copy_with_config(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_qwen3_for_causal_lm_layouts_load_without_missing_keys(tiny, tiny_qwen3, tmp_path):
    from transformers import AutoModel, Qwen3ForCausalLM

    reference = tiny.encode(DOCS, is_query=False)
    # (a) the real Qwen3-Embedding repo: config says Qwen3ForCausalLM, weights saved without the "model." prefix
    embedding_layout = _copy_with_config(tiny_qwen3, tmp_path / "Qwen3-Embedding-layout",
                                         architectures=["Qwen3ForCausalLM"])
    # (b) a full causal LM checkpoint ("model." prefix), e.g. a fine-tuned Qwen3 saved by AutoModelForCausalLM
    lm_layout = tmp_path / "causal-lm"
    lm = Qwen3ForCausalLM(tiny.config)
    lm.model.load_state_dict(tiny.backbone.state_dict())
    lm.save_pretrained(lm_layout)
    tiny.tokenizer.save_pretrained(lm_layout)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling"):
        (shutil.copytree if name == "1_Pooling" else shutil.copy)(f"{tiny_qwen3}/{name}", lm_layout / name)
    for folder in (embedding_layout, str(lm_layout)):
        _, info = AutoModel.from_pretrained(folder, output_loading_info=True)  # what load_embedding_model calls
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        model = load_embedding_model(folder)
        assert model.pooling == "last"
        np.testing.assert_allclose(model.encode(DOCS, is_query=False), reference, atol=1e-5)  # no random init


def test_decoder_without_st_files_defaults_to_last_pooling_and_qwen_prompt(tiny_qwen3, tmp_path):
    folder = tmp_path / "Qwen3-Embedding-tiny"
    shutil.copytree(tiny_qwen3, folder)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        (folder / name).unlink()
    shutil.rmtree(folder / "1_Pooling")
    model = load_embedding_model(str(folder))
    assert model.pooling == "last" and model.query_prompt == "Instruct: " + QWEN3_WEB_SEARCH_TASK + "\nQuery:"
    other = tmp_path / "some-decoder"
    shutil.copytree(folder, other)
    assert load_embedding_model(str(other)).query_prompt == ""


# ---- prompts, eos, truncation, dims, dtypes --------------------------------------------------------
def test_prompt_options(tiny_qwen3):
    task = "Given a medical question, retrieve the answer"
    m = load_embedding_model(tiny_qwen3, query_instruction=task)
    assert m.query_prompt == f"Instruct: {task}\nQuery:" and m.document_prompt == ""
    ids = m.tokenize(["头痛"], is_query=True, max_length=128)["input_ids"][0].tolist()
    assert m.tokenizer.decode(ids) == f"Instruct: {task}\nQuery:头痛<|endoftext|>"  # no space after "Query:"
    assert load_embedding_model(tiny_qwen3, query_instruction=False).query_prompt == ""
    sym = load_embedding_model(tiny_qwen3, query_instruction=task, symmetric=True)
    assert sym.document_prompt == sym.query_prompt == f"Instruct: {task}\nQuery:"
    np.testing.assert_allclose(sym.encode(["头痛"], is_query=False), sym.encode(["头痛"], is_query=True), atol=1e-6)
    with pytest.raises(ConfigError):
        load_embedding_model(tiny_qwen3, query_instruction=3)


def test_prompts_from_sentence_transformers_config(tmp_path):
    from hfemb.modeling.loading import resolve_prompts

    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None}))
    assert resolve_prompts([str(tmp_path)], None, False) == ("query: ", "passage: ")
    assert resolve_prompts([str(tmp_path)], "Find it", False) == ("Instruct: Find it\nQuery:", "passage: ")
    assert resolve_prompts([str(tmp_path)], None, True) == ("query: ", "query: ")
    # default_prompt_name: sentence-transformers applies that prompt whenever none is named
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"classification": "Classify: "}, "default_prompt_name": "classification"}))
    assert resolve_prompts([str(tmp_path)], None, False) == ("Classify: ", "Classify: ")
    assert resolve_prompts([str(tmp_path)], False, False) == ("", "Classify: ")


def test_qwen_tokenizer_end_token_survives_truncation(tiny):
    long_text = "高血压患者需要长期服药并监测血压。" * 20
    enc = tiny.tokenize([long_text, "短"], is_query=False, max_length=8)
    assert enc["input_ids"].shape == (2, 8)
    assert enc["input_ids"][0].tolist()[-1] == ENDOFTEXT_ID and enc["attention_mask"][0].sum() == 8
    assert enc["input_ids"][1].tolist()[-2:] == tiny.tokenizer("短", add_special_tokens=False)["input_ids"] + [ENDOFTEXT_ID]


@pytest.fixture(scope="module")
def tiny_without_eos(tiny_qwen3, tmp_path_factory):
    """The tiny Qwen3 with a tokenizer that appends nothing, loaded as ``Qwen2Tokenizer`` (whose unk token
    is <|endoftext|>) -- like a base Qwen3 LLM's."""
    from tokenizers import Tokenizer, processors

    folder = tmp_path_factory.mktemp("no-eos") / "tiny-qwen3-no-eos"
    shutil.copytree(tiny_qwen3, folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "tokenizer_class": "Qwen2Tokenizer"}))
    return str(folder)


def test_append_eos_for_a_tokenizer_that_appends_nothing(tiny, tiny_without_eos):
    m = load_embedding_model(tiny_without_eos)
    assert type(m.tokenizer).__name__ == "Qwen2Tokenizer" and m.tokenizer.unk_token == "<|endoftext|>"
    assert m.append_eos and m.eos_token_id_to_append == ENDOFTEXT_ID  # <|endoftext|>, not eos_token <|im_end|>
    long_text = "高血压患者需要长期服药并监测血压。" * 20
    enc = m.tokenize([long_text, "短"], is_query=False, max_length=8)
    assert enc["input_ids"].shape == (2, 8) and enc["input_ids"][0, -1] == ENDOFTEXT_ID
    assert enc["input_ids"][1].tolist()[-2:] == m.tokenizer("短", add_special_tokens=False)["input_ids"] + [ENDOFTEXT_ID]
    # same ids, hence the same embeddings, as the tokenizer that appends <|endoftext|> itself
    assert torch.equal(enc["input_ids"], tiny.tokenize([long_text, "短"], is_query=False, max_length=8)["input_ids"])
    np.testing.assert_allclose(m.encode(DOCS, is_query=False), tiny.encode(DOCS, is_query=False), atol=1e-6)
    assert not load_embedding_model(tiny_without_eos, append_eos=False).append_eos
    assert not load_embedding_model(tiny_without_eos, pooling="mean").append_eos


def test_truncate_dim_truncates_then_normalises(tiny, tiny_qwen3):
    m = load_embedding_model(tiny_qwen3, truncate_dim=16)
    assert m.embedding_dim == 16
    out = m.encode(DOCS, is_query=False)
    full = tiny.encode(DOCS, is_query=False)
    assert out.shape == (len(DOCS), 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bfloat16_load_on_cpu(tiny, tiny_qwen3):
    m = load_embedding_model(tiny_qwen3, torch_dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    out = m.encode(DOCS, is_query=False)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)  # normalised in fp32
    cos = (out * tiny.encode(DOCS, is_query=False)).sum(axis=1)
    assert cos.min() > 0.99
    assert load_embedding_model(tiny_qwen3, torch_dtype="auto").dtype == torch.float32  # CPU
    with pytest.raises(ConfigError):
        load_embedding_model(tiny_qwen3, torch_dtype="fp8")


def test_clear_errors(tiny_qwen3, tmp_path):
    with pytest.raises(HfembError, match="not in the Hugging Face cache"):
        load_embedding_model("hfemb-test/no-such-model-anywhere")
    with pytest.raises(HfembError, match="missing: no such model folder"):
        load_embedding_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HfembError, match=r"empty: not a model folder \(no config.json"):
        load_embedding_model(str(tmp_path / "empty"))
    with pytest.raises(HfembError, match="output/run/merged: no such model folder"):
        load_embedding_model("output/run/merged")  # relative, and not a Hub id (two slashes)
    if not torch.cuda.is_available():
        with pytest.raises(HfembError, match="CUDA"):
            load_embedding_model(tiny_qwen3, quantization="4bit")
    with pytest.raises(ConfigError):
        load_embedding_model(tiny_qwen3, pooling="max")
    with pytest.raises(ConfigError, match="truncate_dim 100000 exceeds the model's dimension 64"):
        load_embedding_model(tiny_qwen3, truncate_dim=100000)


# ---- saving: sentence-transformers layout -----------------------------------------------------------
def _st_embeddings(folder: str, queries: list[str], docs: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device="cpu")
    return np.concatenate([st.encode(queries, prompt_name="query"), st.encode(docs)])


@pytest.mark.parametrize("which", ["tiny", "tiny_without_eos", "minilm"])
def test_saved_folder_equals_sentence_transformers_and_reloads(which, request, tmp_path):
    source = request.getfixturevalue("tiny_qwen3" if which == "tiny" else which)
    instruction = None if which == "tiny" else "Given a question, retrieve the answer"
    model = load_embedding_model(source, query_instruction=instruction)
    queries, docs = (QUERIES, DOCS) if which != "minilm" else (QUERIES[1::2], [d for d in DOCS if d.isascii()])
    ours = np.concatenate([model.encode(queries, is_query=True), model.encode(docs, is_query=False)])
    out = tmp_path / "saved"
    model.save_pretrained(out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert {"modules.json", "1_Pooling/config.json", "config_sentence_transformers.json",
            "sentence_bert_config.json", "model.safetensors", "config.json", "tokenizer.json"} <= files
    st_cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"] == {"query": model.query_prompt, "document": ""} and st_cfg["default_prompt_name"] is None
    pooling_cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling_cfg["pooling_mode_lasttoken"] == (model.pooling == "last") and pooling_cfg["include_prompt"]
    np.testing.assert_allclose(_st_embeddings(str(out), queries, docs), ours, atol=1e-5)
    again = load_embedding_model(str(out))
    assert (again.pooling, again.query_prompt, again.document_prompt) == (model.pooling, model.query_prompt, "")
    np.testing.assert_allclose(np.concatenate([again.encode(queries, is_query=True), again.encode(docs, is_query=False)]),
                               ours, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


# ---- LoRA: adapter folders, merged saves, gradient checkpointing -----------------------------------
def _with_lora(model: EmbeddingModel, seed: int = 0) -> EmbeddingModel:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        task_type="FEATURE_EXTRACTION")
    model.backbone = get_peft_model(model.backbone, config)
    return model


def test_lora_adapter_and_merged_folders(tiny_qwen3, tiny, tmp_path):
    model = _with_lora(load_embedding_model(tiny_qwen3, query_instruction="Find the answer"))
    ours = np.concatenate([model.encode(QUERIES, is_query=True), model.encode(DOCS, is_query=False)])
    assert np.abs(ours[len(QUERIES):] - tiny.encode(DOCS, is_query=False)).max() > 1e-3  # the adapter matters
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    loaded = load_embedding_model(str(adapter_dir))
    assert loaded.is_peft and loaded.query_prompt == "Instruct: Find the answer\nQuery:"
    np.testing.assert_allclose(np.concatenate([loaded.encode(QUERIES, is_query=True),
                                               loaded.encode(DOCS, is_query=False)]), ours, atol=1e-5)
    (merged_dir).mkdir()
    (merged_dir / "adapter_config.json").write_text("{}")  # stale adapter files must not survive a merged save
    (merged_dir / "adapter_model.safetensors").write_text("stale")
    (merged_dir / "training_args.bin").write_text("kept")
    model.save_pretrained(merged_dir, merged=True)
    assert model.is_peft  # the in-memory model keeps its adapter
    assert not (merged_dir / "adapter_config.json").exists() and not (merged_dir / "adapter_model.safetensors").exists()
    assert (merged_dir / "training_args.bin").read_text() == "kept"
    merged = load_embedding_model(str(merged_dir))
    assert not merged.is_peft
    merged_out = np.concatenate([merged.encode(QUERIES, is_query=True), merged.encode(DOCS, is_query=False)])
    np.testing.assert_allclose(merged_out, ours, atol=1e-5)
    np.testing.assert_allclose(_st_embeddings(str(merged_dir), QUERIES, DOCS), ours, atol=1e-5)
    # a bare peft folder (adapter files only): tokenizer, pooling and prompts come from the base
    bare = tmp_path / "bare-adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter_dir / name, bare / name)
    loaded = load_embedding_model(str(bare), query_instruction="Find the answer")
    assert loaded.pooling == "last" and loaded.tokenizer.padding_side == "left"
    np.testing.assert_allclose(np.concatenate([loaded.encode(QUERIES, is_query=True),
                                               loaded.encode(DOCS, is_query=False)]), ours, atol=1e-5)
    assert load_embedding_model(str(bare)).query_prompt == tiny.query_prompt  # the base's own prompt


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(tiny_qwen3):
    grads = []
    for checkpointing in (False, True):
        model = _with_lora(load_embedding_model(tiny_qwen3), seed=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model._hf_model().is_activation_checkpointing
        enc_q = model.tokenize(QUERIES, is_query=True, max_length=64)
        enc_d = model.tokenize(DOCS[:4], is_query=False, max_length=64)
        q = model(enc_q["input_ids"], enc_q["attention_mask"])
        d = model(enc_d["input_ids"], enc_d["attention_mask"])
        (q @ d.T).logsumexp(dim=1).mean().backward()
        named = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert named and all(g is not None and g.abs().sum() > 0 for g in named.values())
        grads.append(named)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4)
