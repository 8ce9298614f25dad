"""bench/bench_gpu.py without CUDA: the tiny-shaped run writes one JSON with every case and its table; the
shipped configs' settings are read; an out-of-memory case is reported, not raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; a GPU runs the real shapes (minutes)")
def test_cpu_run_writes_every_case(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--out", str(out), "--steps", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak assumed for MFU" in proc.stdout and "| tiny | lora | 4 | packed |" in proc.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = report["results"]
    assert [(r["finetune"], r["mode"], r["batch"]) for r in rows] == [
        (f, m, b) for f in ("lora", "full")
        for m, b in (("padded", 4), ("chunked", 4), ("packed", 4), ("packed + GradCache (mini-batch 4)", 16))]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / r["probe_flops_per_s"]) and r["probe_flops_per_s"] > 1e8
        assert r["tokens_per_s"] * r["step_seconds"] == pytest.approx(r["real_tokens_per_step"])
        assert r["query_max_len"] == 128 and r["passage_max_len"] == 128 and r["num_negatives"] == 3
    # the three modes of a case see the same batches: the same real tokens per step
    for finetune in ("lora", "full"):
        tokens = {r["real_tokens_per_step"] for r in rows if r["finetune"] == finetune and r["batch"] == 4}
        assert len(tokens) == 1
    assert report["table"] in proc.stdout and report["dtype"] == "float32" and report["device"] == "cpu"


def test_shipped_settings_are_the_configs():
    for name in ("lora", "full", "lora_8b"):
        cfg = json.loads((REPO / "configs" / f"{name}.json").read_text())
        s = bench_gpu.shipped(name)
        assert s["batch"] == cfg["training"]["per_device_train_batch_size"]
        assert s["passage_max_len"] == cfg["data"]["passage_max_len"]
    assert [(c["shape"], c["finetune"], c["checkpointing"]) for c in bench_gpu.cases(["0.6B", "8B"])] == [
        ("0.6B", "lora", False), ("0.6B", "full", False), ("8B", "lora", True)]


def test_out_of_memory_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    def no_memory(*args, **kwargs):
        raise bench_gpu.OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_gpu, "run_case", no_memory)
    assert bench_gpu.main(["--out", str(tmp_path / "r.json"), "--modes", "packed", "--no-grad-cache"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["error"] for r in report["results"]] == ["out of memory", "out of memory"]
    assert "out of memory" in capsys.readouterr().out


def test_cuda_out_of_memory_is_recognised():
    dev = bench_gpu.Device(cuda=False)
    assert dev.is_oom(torch.cuda.OutOfMemoryError("x")) and dev.is_oom(RuntimeError("CUDA out of memory."))
    assert not dev.is_oom(ValueError("shape mismatch"))
