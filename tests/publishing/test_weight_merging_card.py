"""Model cards record weight merging: `hfemb merge-weights` writes ``hfemb_merge.json`` (models named by Hub id
or relative path, never an absolute home path) and a fresh card (not the tuned model's card or threshold),
`hfemb card` rewrites it, and a training output's card shows its checkpoint averaging."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hfemb.cli import main
from hfemb.modeling.merge_weights import AVERAGING_FILE, PROVENANCE_FILE, public_name
from hfemb.publishing.model_card import build_model_card


def _tuned(tiny_qwen3: str, folder: Path) -> Path:
    shutil.copytree(tiny_qwen3, folder)
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "README.md").write_text("# the tuned model's own card\n", encoding="utf-8")
    (folder / "hfemb_threshold.json").write_text(json.dumps({"threshold": 0.61}), encoding="utf-8")
    return folder


def test_merge_weights_records_provenance_and_writes_a_card(tiny_qwen3, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    tuned = _tuned(tiny_qwen3, work / "runs" / "r1" / "merged")
    monkeypatch.chdir(work)
    out = work / "merged-0.3"
    assert main(["merge-weights", "--base", str(tiny_qwen3), "--tuned", str(tuned.parent), "--alpha", "0.3",
                 "--method", "slerp", "--output", str(out)]) == 0, capsys.readouterr().err
    text = (out / PROVENANCE_FILE).read_text(encoding="utf-8")
    record = json.loads(text)
    assert record["method"] == "slerp" and record["alpha"] == 0.3 and record["tensors"] > 0
    assert record["tuned"] == "runs/r1/merged"  # inside the working directory: relative to it
    assert record["base"] == Path(tiny_qwen3).name  # outside it: its name only
    assert str(tmp_path) not in text and os.path.expanduser("~") not in text and not os.path.isabs(record["base"])
    assert not (out / "hfemb_threshold.json").exists()  # the tuned model's threshold is not the merged model's
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "the tuned model's own card" not in card
    assert "## Weight merging" in card and "(slerp, alpha 0.3)" in card and "`runs/r1/merged`" in card
    assert f"`{Path(tiny_qwen3).name}`" in card and str(tmp_path) not in card.split("## Usage")[0]

    (out / "README.md").unlink()
    assert main(["card", str(out)]) == 0, capsys.readouterr().err
    assert "## Weight merging" in (out / "README.md").read_text(encoding="utf-8")
    assert "wrote" in capsys.readouterr().out


def test_public_name():
    assert public_name("Qwen/Qwen3-Embedding-0.6B") == "Qwen/Qwen3-Embedding-0.6B"
    assert public_name("/nonexistent/home/alice/runs/r1/merged") == "r1/merged"
    assert public_name("/nonexistent/home/alice/models/base-model") == "base-model"
    assert public_name(Path.cwd() / "some" / "model") == "some/model"


def _output_with_summary(tiny_qwen3: str, root: Path, finetune: str, averaging: dict | None,
                         in_folder: bool = True) -> Path:
    shutil.copytree(tiny_qwen3, root / "merged")
    summary = {"config": {"model": {"name_or_path": "Qwen/Qwen3-Embedding-0.6B", "finetune_type": finetune},
                          "training": {"learning_rate": 1e-4}}, "global_step": 6, "checkpoint_averaging": averaging}
    (root / "train_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if in_folder and averaging and "error" not in averaging:
        (root / "merged" / AVERAGING_FILE).write_text(json.dumps(averaging), encoding="utf-8")
    return root / "merged"


def test_card_shows_checkpoint_averaging(tiny_qwen3, tmp_path, capsys):
    record = {"k": 3, "steps": [4, 5, 6], "checkpoints": ["checkpoint-4", "checkpoint-5", "checkpoint-6"],
              "stored_dtype": "float32", "rule": "per-tensor mean in fp32 of each checkpoint's LoRA merged onto the base"}
    lora = build_model_card(_output_with_summary(tiny_qwen3, tmp_path / "lora", "lora", record), eval_results=False)
    section = lora.text.split("## Weight merging")[1].split("\n## ")[0]
    assert "mean (in fp32) of the last 3 checkpoints of the run, at steps 4, 5, 6" in section
    assert "not of A and B" in section and "last step's model, not of this average" in section
    full_record = {**record, "rule": "per-tensor mean in fp32 of the checkpoints' weights"}
    full = build_model_card(_output_with_summary(tiny_qwen3, tmp_path / "full", "full", full_record),
                            eval_results=False)
    assert "steps 4, 5, 6" in full.text and "not of A and B" not in full.text
    failed = build_model_card(_output_with_summary(tiny_qwen3, tmp_path / "bad", "full", {"k": 2, "error": "boom"}),
                              eval_results=False)
    assert "was configured but failed: boom; these weights are the last step's" in failed.text
    plain = build_model_card(_output_with_summary(tiny_qwen3, tmp_path / "plain", "full", None), eval_results=False)
    assert "Weight merging" not in plain.text
    # merged/ re-made without averaging (e.g. `hfemb merge` of adapter/): the summary alone claims nothing
    remade = build_model_card(_output_with_summary(tiny_qwen3, tmp_path / "remade", "lora", record, in_folder=False),
                              eval_results=False)
    assert "Weight merging" not in remade.text

    # interpolating an averaged model with its base keeps the fact, in hfemb_merge.json and the card
    out = tmp_path / "interpolated"
    assert main(["merge-weights", "--base", tiny_qwen3, "--tuned", str(tmp_path / "lora"), "--alpha", "0.5",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / PROVENANCE_FILE).read_text())["tuned_checkpoint_averaging"] == {"k": 3, "steps": [4, 5, 6]}
    assert not (out / AVERAGING_FILE).exists()  # the output is not itself that average
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "itself the mean of its run's last 3 checkpoints, steps 4, 5, 6" in card
    assert "- **checkpoint averaging**" not in card
