"""`hfemb merge` (merged == adapter embeddings on the tiny Qwen3, == sentence-transformers, no adapter files,
quantized bases refused) and the training side of export: the HF Trainer never pushes, `training.push_to_hub`
pushes the final model through hfemb after training."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

from hfemb.cli import main
from hfemb.errors import ConfigError, HfembError

QUERIES = ["高血压患者日常饮食需要注意什么？", "头痛怎么办", "What should I eat with high blood pressure?"]
DOCS = ["低盐饮食，多吃蔬菜水果。", "A long answer about hypertension: less salt, more vegetables, regular exercise.", "好"]
SECRET = "hf_EXPORTtestSECRET0123456789"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_qwen3):
    """A bare LoRA adapter folder on the tiny Qwen3 with random (non-zero) LoRA B weights."""
    from peft import LoraConfig, get_peft_model

    from hfemb.modeling.loading import load_embedding_model

    model = load_embedding_model(tiny_qwen3)
    model.backbone = get_peft_model(model.backbone, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="FEATURE_EXTRACTION"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    return path


def _encode(path: str | Path):
    from hfemb.modeling.loading import load_embedding_model

    model = load_embedding_model(str(path))
    return model.encode(QUERIES, is_query=True), model.encode(DOCS, is_query=False)


def test_merge_cli_matches_adapter_and_sentence_transformers(adapter_dir, tiny_qwen3, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "merged"
    assert main(["merge", str(adapter_dir), "--output", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert {"model.safetensors", "config.json", "modules.json", "config_sentence_transformers.json",
            "sentence_bert_config.json", "1_Pooling", "tokenizer.json", "README.md"} <= names
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # auto: the base's own dtype
    merged_q, merged_d = _encode(out)
    adapter_q, adapter_d = _encode(adapter_dir)
    np.testing.assert_allclose(merged_q, adapter_q, atol=1e-5)
    np.testing.assert_allclose(merged_d, adapter_d, atol=1e-5)
    base_q, _ = _encode(tiny_qwen3)
    assert np.abs(base_q - merged_q).max() > 1e-2  # the adapter changed the model, and the merge kept it
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), merged_q, atol=1e-5)
    np.testing.assert_allclose(st.encode(DOCS), merged_d, atol=1e-5)
    card = ModelCard.load(out / "README.md")
    assert "lora" in card.data.tags and card.data.library_name == "sentence-transformers"
    assert f"`{tiny_qwen3}` (a local model folder)" in card.text


def test_merge_dtype_and_overwrite(adapter_dir, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert main(["merge", str(adapter_dir), "--output", str(out), "--dtype", "bfloat16"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user file"
    assert main(["merge", str(adapter_dir), "--output", str(out), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    merged_q, _ = _encode(out)
    adapter_q, _ = _encode(adapter_dir)
    assert np.abs(merged_q - adapter_q).max() < 0.05  # bf16 weights: close, not equal


def test_merge_from_a_training_output_folder(adapter_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    assert main(["merge", str(run), "--output", str(tmp_path / "out")]) == 0
    np.testing.assert_allclose(_encode(tmp_path / "out")[0], _encode(adapter_dir)[0], atol=1e-5)


def test_merge_refusals(adapter_dir, tiny_qwen3, tmp_path, capsys):
    # a quantized base: refused, nothing written
    qbase = tmp_path / "qbase"
    shutil.copytree(tiny_qwen3, qbase)
    config = json.loads((qbase / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(config))
    qadapter = tmp_path / "qadapter"
    shutil.copytree(adapter_dir, qadapter)
    acfg = json.loads((qadapter / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(qbase)
    (qadapter / "adapter_config.json").write_text(json.dumps(acfg))
    assert main(["merge", str(qadapter), "--output", str(tmp_path / "q_out")]) == 2
    err = capsys.readouterr().err
    assert "quantized" in err and "unquantized base" in err and not (tmp_path / "q_out").exists()
    # not an adapter; output inside the adapter
    assert main(["merge", tiny_qwen3, "--output", str(tmp_path / "x")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
    assert main(["merge", str(adapter_dir), "--output", str(adapter_dir / "merged")]) == 2
    assert "inside it" in capsys.readouterr().err
    assert not (adapter_dir / "merged").exists()


# ---- training: the Trainer never pushes; hfemb does, after training -------------------------------
def _make_config(tiny_qwen3, train_file, out, **training):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import make_config

    return make_config(tiny_qwen3, str(train_file), out, training={"max_steps": 1, **training})


@pytest.fixture(scope="module")
def train_file(tmp_path_factory, zh_sample_csv):
    from hfemb.data.formats import read_records

    recs = read_records(str(zh_sample_csv)).records[:8]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(recs):
            fh.write(json.dumps({"query": r.query, "positive": r.positives[0],
                                 "negative": [recs[(i + 1) % 8].positives[0], recs[(i + 2) % 8].positives[0]]},
                                ensure_ascii=False) + "\n")
    return path


@pytest.fixture
def online(monkeypatch, tmp_path_factory):
    """Online mode, HF_TOKEN set, HfApi replaced by a recorder (no network)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    calls: list = []

    class Api:
        fail = False

        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", kwargs, sorted(p.relative_to(folder).as_posix()
                                                          for p in folder.rglob("*") if p.is_file())))
            if Api.fail:
                from huggingface_hub.errors import HfHubHTTPError
                import httpx2

                request = httpx2.Request("POST", "https://huggingface.co/api/models/alice/x/commit/main")
                raise HfHubHTTPError("403", response=httpx2.Response(403, request=request))
            return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/alice/tiny/commit/1",
                                              commit_message="", commit_description="", oid="1")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    return Api, calls


def test_training_arguments_never_let_the_trainer_push(tiny_qwen3, train_file, tmp_path, online, monkeypatch):
    import huggingface_hub.constants as constants

    from hfemb.training.run_setup import training_arguments

    cfg = _make_config(tiny_qwen3, train_file, tmp_path, push_to_hub=True, hub_model_id="alice/tiny",
                       hub_private_repo=True, hub_strategy="every_save")
    args = training_arguments(cfg, has_eval=False)
    assert args.push_to_hub is False and args.hub_model_id is None and args.hub_private_repo is None
    assert cfg.training["push_to_hub"] is True  # the config keeps it for hfemb's own push
    with pytest.raises(ConfigError, match="tokens never go in config files.*HF_TOKEN.*hf auth login"):
        training_arguments(_make_config(tiny_qwen3, train_file, tmp_path, hub_token="hf_x"), has_eval=False)
    with pytest.raises(ConfigError, match="hub_model_id"):
        training_arguments(_make_config(tiny_qwen3, train_file, tmp_path, push_to_hub=True), has_eval=False)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfembError, match="no Hugging Face token"):  # before any training step
        training_arguments(cfg, has_eval=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HfembError, match="cannot reach the Hub: HF_HUB_OFFLINE=1"):
        training_arguments(cfg, has_eval=False)


def test_run_training_pushes_the_final_model(tiny_qwen3, train_file, tmp_path, online, capsys):
    from hfemb.training.runner import run_training

    api, calls = online
    out = tmp_path / "run"
    summary = run_training(_make_config(tiny_qwen3, train_file, out, push_to_hub=True, hub_model_id="alice/tiny",
                                        hub_private_repo=True))
    assert [c[0] for c in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[1][1:] == ("alice/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    uploaded = calls[2][2]
    merged = sorted(p.relative_to(out / "merged").as_posix() for p in (out / "merged").rglob("*") if p.is_file())
    assert uploaded == sorted(set(merged) | {"train_summary.json"})
    assert summary["pushed_to"] == "https://huggingface.co/alice/tiny/commit/1"
    assert json.loads((out / "train_summary.json").read_text())["pushed_to"] == summary["pushed_to"]
    assert (out / "merged" / "README.md").is_file() and (out / "adapter" / "README.md").is_file()
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".txt"):
            assert SECRET not in path.read_text(encoding="utf-8", errors="ignore"), path

    api.fail = True
    calls.clear()
    with pytest.raises(HfembError, match=r"training finished and was saved to .*but the push failed: no write "
                                         r"permission for alice/tiny.*hfemb push"):
        run_training(_make_config(tiny_qwen3, train_file, tmp_path / "run2", push_to_hub=True,
                                  hub_model_id="alice/tiny"))
    assert (tmp_path / "run2" / "merged" / "model.safetensors").is_file()
    assert "pushed_to" not in json.loads((tmp_path / "run2" / "train_summary.json").read_text())
