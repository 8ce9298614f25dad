"""Crash recovery (issue 17): a run killed while writing a checkpoint or its final save resumes from the last
complete checkpoint, logs each step once, reports the loss of the whole run and leaves a clean folder. The
oracle is the same run never interrupted (resume is bit-exact)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hfemb.errors import HfembError
from test_trainer import make_config, mined_file  # noqa: F401 - the fixture is used by name


def _cfg(model, data, out, steps=4):
    return make_config(model, data, out, training={
        "max_steps": steps, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 3,
        "lr_scheduler_type": "constant", "warmup_ratio": 0.0})


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text(encoding="utf-8").splitlines() if '"loss"' in line]


def test_killed_run_resumes_from_last_complete_checkpoint(tiny_qwen3, mined_file, tmp_path, capsys):  # noqa: F811
    from hfemb.publishing.model_card import check_training_output
    from hfemb.training.runner import run_training

    full = run_training(_cfg(tiny_qwen3, mined_file, tmp_path / "full"))
    cut = tmp_path / "cut"
    run_training(_cfg(tiny_qwen3, mined_file, cut))
    # simulate kill -9 while checkpoint-4 and the final save were being written
    (cut / "checkpoint-4" / "trainer_state.json").unlink()
    shutil.rmtree(cut / "merged")
    shutil.rmtree(cut / "adapter")
    (cut / "train_summary.json").unlink()
    leftover = cut / ".merged.k1ll3d"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    with open(cut / "train_log.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 4, "loss": 0.')  # half-written last line
    with pytest.raises(HfembError, match=r"missing train_summary.json and merged/ or adapter/.*\.merged\.k1ll3d"):
        check_training_output(cut)
    with pytest.raises(HfembError, match="incomplete checkpoint"):
        run_training(_cfg(tiny_qwen3, mined_file, cut), resume=str(cut / "checkpoint-4"))

    summary = run_training(_cfg(tiny_qwen3, mined_file, cut), resume=True)
    assert "skipped incomplete checkpoint-4" in capsys.readouterr().out
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    # each step logged once, as in the uninterrupted run
    assert _steps(cut / "train_log.jsonl") == _steps(tmp_path / "full" / "train_log.jsonl") == [1, 2, 3, 4]
    # the loss of the whole run, not of steps 3-4 only
    assert summary["train"]["train_loss"] == pytest.approx(full["train"]["train_loss"], rel=1e-5)
    logged = [json.loads(x)["loss"] for x in (cut / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
              if '"loss"' in x]
    assert summary["train"]["train_loss"] == pytest.approx(sum(logged) / 4, rel=1e-3)
    assert summary["train"]["train_loss_this_run"] != pytest.approx(full["train"]["train_loss"], rel=1e-3)
    assert not list(cut.glob(".merged.*")) and not list(cut.glob(".adapter.*"))
    check_training_output(cut)  # complete again
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    # resuming a finished run again (transformers then runs one more step when max_steps falls mid-epoch):
    # the loss is still the mean over every step of the run, i.e. over the per-step losses logged
    again = run_training(_cfg(tiny_qwen3, mined_file, cut), resume=True)
    assert again["resumed_from"].endswith("checkpoint-4")
    losses = [json.loads(x)["loss"] for x in (cut / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
              if '"loss"' in x]
    assert _steps(cut / "train_log.jsonl") == list(range(1, again["global_step"] + 1))
    assert again["train"]["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-3)


def test_no_complete_checkpoint_is_a_clear_error(tmp_path):
    from hfemb.training.resume import last_complete_checkpoint, resolve_resume

    for n in (2, 4):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    found, skipped = last_complete_checkpoint(tmp_path)
    assert found == str(tmp_path / "checkpoint-2")
    assert [(Path(f).name, "unreadable" in why) for f, why in skipped] == [("checkpoint-4", True)]
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(HfembError, match=r"no complete checkpoint-\* folder .*2 incomplete"):
        resolve_resume(tmp_path, True)


def test_train_log_truncated_to_the_checkpoint_step(tmp_path):
    from hfemb.training.resume import truncate_train_log

    log = tmp_path / "train_log.jsonl"
    rows = [{"step": s, "loss": s / 10} for s in (1, 2, 3)] + [{"step": 2, "eval_loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo', encoding="utf-8")
    assert truncate_train_log(log, 2) == 2
    assert [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()] == [r for r in rows if r["step"] <= 2]


def test_whole_run_loss_by_hand():
    from hfemb.training.resume import whole_run_loss

    # steps 1-2 summed 3.0 before the kill; steps 3-4 averaged 0.5 after the resume: (3.0 + 1.0) / 4
    assert whole_run_loss(0.5, 2, (3.0, 2), 4) == pytest.approx(1.0)
    assert whole_run_loss(0.0, 0, (3.0, 4), 4) == pytest.approx(0.75)  # a resume that only re-saved
    assert whole_run_loss(0.5, 2, None, 4) is None  # an older checkpoint without the sum: unknown, not wrong


def test_loss_sum_written_only_when_known(tmp_path):
    from types import SimpleNamespace

    from hfemb.training.resume import LOSS_FILE, RunLossCallback, previous_loss_sum

    (tmp_path / "checkpoint-6").mkdir()
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=6, is_world_process_zero=True)
    trainer = SimpleNamespace(_total_loss_scalar=2.5, _tr_loss=torch.tensor(0.5))
    unknown = RunLossCallback(None)  # resumed from a checkpoint without the sum: writing 3.0 would be wrong
    unknown.trainer = trainer
    unknown.on_save(args, state, None)
    assert not (tmp_path / "checkpoint-6" / LOSS_FILE).exists()
    known = RunLossCallback(1.5)  # steps before the resume summed 1.5; this run 2.5 logged + 0.5 pending
    known.trainer = trainer
    known.on_save(args, state, None)
    assert previous_loss_sum(str(tmp_path / "checkpoint-6")) == (pytest.approx(4.5), 6)
