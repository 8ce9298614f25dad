"""Length-chunked forward of `EmbeddingModel`: the chunking is optimal, and embeddings and gradients equal
one padded forward (left padding on the tiny Qwen3, right padding on MiniLM)."""

from __future__ import annotations

import itertools

import pytest
import torch

from hfemb.modeling.loading import load_embedding_model
from hfemb.modeling.pooling import length_chunks

TEXTS = ["short", "a somewhat longer sentence about glaciers and caves", "x",
         "一个中文句子，关于高血压的治疗和饮食建议，还有一些额外的文字使它更长一些。",
         "medium length text here", "another one that is rather long, with several clauses, commas and words in it"]


def brute_force_cost(lengths, overhead):
    """Cheapest cost over every split of the length-sorted rows into contiguous chunks."""
    ls = sorted(lengths, reverse=True)
    best = float("inf")
    for cuts in itertools.product([0, 1], repeat=len(ls) - 1):
        cost, start = 0, 0
        for i, cut in enumerate(list(cuts) + [1]):
            if cut:
                cost += (i + 1 - start) * ls[start] + overhead
                start = i + 1
        best = min(best, cost)
    return best


@pytest.mark.parametrize("overhead", [0, 5, 64, 1000])
def test_length_chunks_is_optimal_and_a_partition(overhead):
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 120, (int(torch.randint(1, 9, (1,), generator=rng)),), generator=rng).tolist()
        chunks = length_chunks(lengths, overhead)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        cost = sum(len(c) * max(lengths[i] for i in c) + overhead for c in chunks)
        assert cost == brute_force_cost(lengths, overhead)


def test_length_chunks_edges():
    assert length_chunks([], 64) == []
    assert length_chunks([7], 64) == [[0]]
    assert length_chunks([10, 10, 10], 0) in ([[0, 1, 2]], [[0], [1], [2]], [[0, 1], [2]], [[0], [1, 2]])
    assert len(length_chunks([100, 2, 2, 2, 2, 2, 2, 2], 5)) == 2  # the long row alone, the short ones together


@pytest.mark.parametrize("which", ["tiny_qwen3", "minilm"])
def test_chunked_forward_equals_padded_forward(which, request):
    model = load_embedding_model(request.getfixturevalue(which), torch_dtype="float32")
    model.train(False)
    enc = model.tokenize(TEXTS, is_query=False, max_length=64)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 2 and len(length_chunks(lengths, 2)) > 1
    results = {}
    for overhead in (0, 2):
        model.chunk_overhead_tokens = overhead
        model.zero_grad(set_to_none=True)
        emb = model(enc["input_ids"], enc["attention_mask"])
        (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[overhead] = (emb.detach(), grads)
    (e0, g0), (e1, g1) = results[0], results[2]
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5)
    # and the same as encoding each text alone
    singles = [model.tokenize([t], is_query=False, max_length=64) for t in TEXTS]
    alone = torch.cat([model(s["input_ids"], s["attention_mask"]) for s in singles]).detach()
    torch.testing.assert_close(e1, alone, rtol=1e-5, atol=1e-5)


def test_chunked_forward_with_lora_and_checkpointing(tiny_qwen3):
    """peft backbone + activation checkpointing: chunks feed inputs_embeds; LoRA gradients are unchanged."""
    from peft import LoraConfig, get_peft_model

    model = load_embedding_model(tiny_qwen3, torch_dtype="float32")
    torch.manual_seed(0)
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    model.activation_checkpointing_enable()
    model.train()
    enc = model.tokenize(TEXTS, is_query=True, max_length=64)
    results = {}
    for overhead in (0, 2):
        model.chunk_overhead_tokens = overhead
        model.zero_grad(set_to_none=True)
        emb = model(enc["input_ids"], enc["attention_mask"])
        emb[:, :8].sum().backward()
        results[overhead] = (emb.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (e0, g0), (e1, g1) = results[0], results[2]
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and all("lora_" in n for n in g0) and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5)


def _tiny_gpt2_embedding_model():
    """A random 2-layer gpt2 (absolute position embeddings) with the Qwen BPE, last-token pooling (left padding)."""
    from transformers import GPT2Config, GPT2Model

    from hfemb.modeling.model import EmbeddingModel
    from hfemb.testing.tiny import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    backbone = GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2))
    backbone.eval()
    return EmbeddingModel(backbone, tokenizer, pooling="last")


def test_absolute_positions_with_left_padding_run_unchunked():
    """gpt2 with left padding: cutting a chunk's leading padding moves its rows' absolute positions, so
    chunking would change the embeddings (shown with chunking forced on); the model turns it off and the
    batch equals one padded forward."""
    from transformers import GPT2Config, Qwen3Config

    from hfemb.modeling.pooling import length_chunking_is_exact

    assert not length_chunking_is_exact(GPT2Config(), "left") and length_chunking_is_exact(GPT2Config(), "right")
    assert length_chunking_is_exact(Qwen3Config(), "left")
    model = _tiny_gpt2_embedding_model()
    enc = model.tokenize(TEXTS, is_query=False, max_length=64)
    assert len(length_chunks(enc["attention_mask"].sum(1).tolist(), 2)) > 1
    with torch.no_grad():
        default = model(enc["input_ids"], enc["attention_mask"])
        model.chunk_overhead_tokens = 0
        padded = model(enc["input_ids"], enc["attention_mask"])
        model.chunk_overhead_tokens = 2
        forced = model(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(default, padded, rtol=0, atol=0)
    assert (forced - padded).abs().max() > 1e-3  # what chunking did before: different embeddings
