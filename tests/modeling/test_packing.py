"""Padding-free (packed) batches (`hfemb.modeling.packing`) against the padded path: the packing itself by
hand, the block-diagonal mask transformers builds from packed position_ids against a hand-built one,
embeddings, attention isolation between texts, and a training step's loss and gradients (plain and
GradCache), with sdpa and eager, on the tiny Qwen3 and tiny random Llama / Mistral / Qwen2 backbones."""

from __future__ import annotations

import pytest
import torch

from hfemb.errors import ConfigError
from hfemb.modeling import packing
from hfemb.modeling.loading import load_embedding_model
from hfemb.modeling.packing import pack_batch, pack_rows, packing_support, resolve_padding_free
from hfemb.modeling.pooling import pool

TEXTS = ["高血压能吃党参吗？", "肝病患者的饮食要注意什么，能不能喝酒，平时应该怎么调理身体？" * 3, "a",
         "头痛怎么办 " * 20, "糖尿病", "What is the normal blood pressure of an adult?"]


def _model(path, attn="sdpa", pooling=None, padding_free=False):
    model = load_embedding_model(path, torch_dtype="float32", attn_implementation=attn, pooling=pooling,
                                 padding_free=padding_free)
    model.chunk_overhead_tokens = 0  # the reference: one padded forward per batch
    return model


# ---- the packing itself ------------------------------------------------------------------------
def test_pack_rows_is_a_partition_within_capacity():
    lengths = [5, 9, 1, 7, 3, 3, 12, 2]
    for capacity in (12, 15, 40):
        rows = pack_rows(lengths, capacity)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
        assert len(rows) <= len(pack_rows(lengths, capacity - 1))
    assert pack_rows(lengths, None) == [list(range(8))]
    assert pack_rows([20, 3], 10) == [[0], [1]]  # a text longer than a row gets its own row


@pytest.mark.parametrize("side", ["left", "right"])
def test_pack_batch_by_hand(side):
    pad = 0
    rows = [[11, 12, 13], [21], [31, 32]]
    t = 3
    ids = torch.full((3, t), pad)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(t - len(r), t) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    one = pack_batch(ids, mask, pad_id=pad, varlen=True)
    assert one.input_ids.tolist() == [[11, 12, 13, 21, 31, 32]]
    assert one.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert one.last.tolist() == [2, 3, 5] and one.first.tolist() == [0, 3, 4]
    assert one.segment.tolist() == [0, 0, 0, 1, 2, 2]
    assert one.flash_kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and one.flash_kwargs["max_length_q"] == 3


def test_pack_batch_rows_with_pad_tails():
    assert packing.MIN_ROW_TOKENS == 0  # rows of at most the longest text (4 tokens)
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]])
    mask = (ids != 0).long()
    p = pack_batch(ids, mask, pad_id=0, varlen=False)
    assert p.input_ids.tolist() == [[7, 8, 9, 10], [5, 6, 11, 0]]  # longest first, first fit
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]  # the pad tail is a segment of its own
    assert p.last.tolist() == [5, 3, 6] and p.flash_kwargs == {}


def test_flash_kwargs_match_transformers(tiny_qwen3):
    """cu_seq_lens / max lengths handed to FlashAttention varlen equal what transformers derives from the
    packed position_ids itself (`prepare_fa_kwargs_from_position_ids`)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    model = _model(tiny_qwen3)
    enc = model.tokenize(TEXTS, is_query=False, max_length=64)
    p = pack_batch(enc["input_ids"], enc["attention_mask"], pad_id=0, varlen=True)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(p.position_ids)
    assert p.flash_kwargs["cu_seq_lens_q"].tolist() == cu_q.tolist() == cu_k.tolist()
    assert p.flash_kwargs["max_length_q"] == int(max_q) == int(max_k)


# ---- transformers' mask from packed position_ids --------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_builds_a_block_diagonal_causal_mask(tiny_qwen3, attn):
    from transformers.masking_utils import create_causal_mask

    model = _model(tiny_qwen3, attn)
    config = model.backbone.config
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 0, 1]])
    segment = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3, 3])
    embeds = torch.zeros(1, 10, config.hidden_size)
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                              position_ids=position_ids)
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # eager: additive, 0 = attend
    i, j = torch.arange(10).unsqueeze(1), torch.arange(10).unsqueeze(0)
    expected = (segment[i] == segment[j]) & (j <= i)
    assert allowed.tolist() == expected.tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_never_crosses_texts(tiny_qwen3, attn, monkeypatch):
    """Changing one text of a packed row leaves every other text's embedding unchanged."""
    monkeypatch.setattr(packing, "MIN_ROW_TOKENS", 10_000)  # every text in one row
    model = _model(tiny_qwen3, attn, padding_free=True)
    enc = model.tokenize(TEXTS, is_query=False, max_length=64)
    changed = list(TEXTS)
    changed[1] = "完全不同的另一段文字，" * 4
    enc2 = model.tokenize(changed, is_query=False, max_length=64)
    with torch.no_grad():
        a = model(enc["input_ids"], enc["attention_mask"])
        b = model(enc2["input_ids"], enc2["attention_mask"])
    assert pack_batch(enc["input_ids"], enc["attention_mask"], pad_id=0, varlen=False).input_ids.shape[0] == 1
    others = [i for i in range(len(TEXTS)) if i != 1]
    assert (a[others] - b[others]).abs().max() < 1e-6
    assert (a[1] - b[1]).abs().max() > 1e-2


# ---- embeddings and training against the padded path -------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
@pytest.mark.parametrize("row_tokens", [10_000, 0])
def test_packed_embeddings_equal_padded(tiny_qwen3, attn, pooling, row_tokens, monkeypatch):
    monkeypatch.setattr(packing, "MIN_ROW_TOKENS", row_tokens)  # 0 (default): several rows with pad tails
    model = _model(tiny_qwen3, attn, pooling)
    padded = model.encode(TEXTS, is_query=True, convert_to_numpy=False)
    model.padding_free = True
    packed = model.encode(TEXTS, is_query=True, convert_to_numpy=False)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    enc = model.tokenize(TEXTS, is_query=True, max_length=512)
    rows = pack_batch(enc["input_ids"], enc["attention_mask"], pad_id=0, varlen=False).input_ids.shape[0]
    assert (rows == 1) if row_tokens > 100 else (rows > 1)


def _loss_and_grads(model, enc_q, enc_d, grad_cache: int | None = None):
    from hfemb.training.grad_cache import grad_cache_step
    from hfemb.training.loss import info_nce_loss

    model.zero_grad()
    loss_fn = lambda q, d: info_nce_loss(q, d, group_size=2, temperature=0.05)  # noqa: E731
    if grad_cache:
        inputs = {"query_input_ids": enc_q["input_ids"], "query_attention_mask": enc_q["attention_mask"],
                  "doc_input_ids": enc_d["input_ids"], "doc_attention_mask": enc_d["attention_mask"]}
        loss = grad_cache_step(model, inputs, loss_fn, grad_cache).loss
    else:
        out = loss_fn(model(enc_q["input_ids"], enc_q["attention_mask"]),
                      model(enc_d["input_ids"], enc_d["attention_mask"]))
        out.loss.backward()
        loss = out.loss
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("grad_cache", [None, 2])
def test_training_step_loss_and_gradients_equal_padded(tiny_qwen3, attn, grad_cache):
    """LoRA + activation checkpointing, InfoNCE on 3 queries x 2 documents: packed = padded."""
    from peft import LoraConfig, get_peft_model

    model = _model(tiny_qwen3, attn)
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in model.named_parameters():  # non-zero LoRA B, so every LoRA weight gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
    model.activation_checkpointing_enable()
    model.train()
    enc_q = model.tokenize(TEXTS[:3], is_query=True, max_length=64)
    enc_d = model.tokenize(TEXTS, is_query=False, max_length=64)
    loss_ref, grads_ref = _loss_and_grads(model, enc_q, enc_d, grad_cache)
    model.padding_free = True
    loss, grads = _loss_and_grads(model, enc_q, enc_d, grad_cache)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 3 * 2
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_other_rotary_decoders_pack_like_padded(model_type, attn):
    """Tiny random Llama / Mistral / Qwen2 backbones: packed last-token and mean pooling = padded (left)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, attn_implementation=attn)
    torch.manual_seed(0)
    backbone = AutoModel.from_config(config).eval()
    assert packing_support(backbone.config)[0]
    lengths = [7, 2, 12, 5]
    ids = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 12 - n:] = torch.randint(1, 100, (n,), generator=torch.Generator().manual_seed(i))
        mask[i, 12 - n:] = 1
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask)[0]
        for pooling in ("last", "mean"):
            got = packing.packed_forward(backbone, ids, mask, pooling, pad_id=0)
            torch.testing.assert_close(got, pool(hidden, mask, pooling), atol=1e-5, rtol=0)


# ---- when it is on ---------------------------------------------------------------------------------
def test_auto_is_on_for_rotary_decoders_only(tiny_qwen3, minilm):
    assert load_embedding_model(tiny_qwen3, padding_free="auto").padding_free is True
    assert load_embedding_model(tiny_qwen3).padding_free is False  # the library default: padded
    assert load_embedding_model(minilm, padding_free="auto").padding_free is False
    with pytest.raises(ConfigError, match="model type 'bert'"):
        load_embedding_model(minilm, padding_free=True)
    config = load_embedding_model(tiny_qwen3).backbone.config
    config._attn_implementation = "some_kernel"
    assert resolve_padding_free("auto", config) is False
    with pytest.raises(ConfigError, match="some_kernel"):
        resolve_padding_free(True, config)
    with pytest.raises(ConfigError, match="auto, true or false"):
        resolve_padding_free("yes", config)


def test_minilm_with_padding_free_auto_encodes_as_before(minilm):
    """An encoder keeps the padded path under auto (absolute positions, bidirectional attention)."""
    ref = load_embedding_model(minilm).encode(TEXTS, is_query=False)
    got = load_embedding_model(minilm, padding_free="auto").encode(TEXTS, is_query=False)
    assert (ref == got).all()


def test_eval_and_serve_options(tiny_qwen3):
    """`hfemb eval --padding-free` / the eval config's `padding_free` reach the loaded model; serve's default is auto."""
    import argparse

    from hfemb.commands import eval as eval_command
    from hfemb.commands import serve as serve_command
    from hfemb.evaluation.encoders import load_encoder
    from hfemb.evaluation.settings import EvalSettings

    assert load_encoder(tiny_qwen3, EvalSettings(device="cpu")).padding_free is True  # auto
    assert load_encoder(tiny_qwen3, EvalSettings(device="cpu", padding_free="false")).padding_free is False
    with pytest.raises(ConfigError, match="padding_free must be auto, true or false"):
        EvalSettings(padding_free="on")
    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    assert parser.parse_args(["--padding-free", "false"]).padding_free == "false"
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    assert parser.parse_args(["m"]).padding_free == "auto"
    assert parser.parse_args(["m", "--padding-free", "true"]).padding_free == "true"
