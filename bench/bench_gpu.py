"""GPU benchmark: training-step speed and memory of Qwen3-Embedding-shaped models, padded vs length-chunked
vs padding-free (packed) batches.

    python bench/bench_gpu.py --out gpu.json [--steps 6] [--warmup 2] [--peak-tflops 989]

On a CUDA device: Qwen3-Embedding-0.6B- and 8B-shaped models built from their configs (the values are
written below) with **random weights** -- speed and memory do not depend on the weights, and no Hub access
is needed -- the real Qwen BPE (``hfemb.testing.tiny.build_qwen_tokenizer``), bf16, and texts from
``../shared/data/zh_medical_qa`` (each step: the shipped config's batch of questions, their answers and 3
other answers as negatives, tokenised with the configs' prompt and max lengths). Cases:

* 0.6B LoRA and 0.6B full fine-tuning (``configs/lora.json``, ``configs/full.json`` batch sizes), no
  gradient checkpointing; 8B LoRA with gradient checkpointing (``configs/lora_8b.json``);
* each with padded batches (one forward per side, padded to its longest text), length chunks (hfemb's
  default padded path) and padding-free batches (FlashAttention-2 varlen when ``flash_attn`` is
  installed, else sdpa with block-diagonal masks);
* GradCache (``hfemb.training.grad_cache``) at 4x the batch, mini-batch = the config's batch, packed.

Per case: real (non-pad) tokens/s, samples/s, model FLOP utilisation (MFU: 3 x forward FLOPs of the
real tokens, ``bench/common.training_flops``, per second, over the device's dense bf16 peak -- printed;
give ``--peak-tflops`` for a device the table below does not know), and peak memory
(``torch.cuda.max_memory_allocated``). A case that runs out of memory is reported as such and the
benchmark goes on; a model that does not fit at all is skipped with a message.

Without CUDA it runs tiny shapes in fp32 on the CPU (well under a minute; tests/test_bench_gpu.py runs it):
"MFU" is then the real-token FLOP rate over a 1024^3 fp32 matmul timed after every step of the case (the
median; it cancels the load of a shared machine, as in bench_train.py), memory is the peak RSS.
``--shapes small`` (CPU) is a MiniLM-sized Qwen3 (hidden 384, 6 layers) whose real-token FLOP rate against
that matmul is comparable with ``bench/bench_train.py``'s figure for MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "zh_medical_qa" / "internal_medicine_qa.csv"

# config.json of Qwen/Qwen3-Embedding-0.6B and -8B (Qwen3Model; the fields that shape the compute)
QWEN3_EMBEDDING_CONFIGS = {
    "0.6B": dict(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "8B": dict(vocab_size=151665, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # CPU stand-ins
    "tiny": dict(vocab_size=151669, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=32768, rope_theta=1000000.0),
    "small": dict(vocab_size=151669, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
                  rope_theta=1000000.0),
}
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name fragment, most specific first.
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
                    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
                    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0),
                    ("RTX 3090", 71.0), ("V100", 0.0)]
MODES = ("padded", "chunked", "packed")
GRAD_CACHE_FACTOR = 4


class OutOfMemory(Exception):
    pass


def shipped(name: str) -> dict:
    """Batch size, lengths, negatives, LoRA settings and prompt of ``configs/NAME.json``."""
    cfg = json.loads((REPO / "configs" / f"{name}.json").read_text(encoding="utf-8"))
    lora = cfg.get("lora") or {}
    return {"config": f"configs/{name}.json", "batch": cfg["training"]["per_device_train_batch_size"],
            "query_max_len": cfg["data"]["query_max_len"], "passage_max_len": cfg["data"]["passage_max_len"],
            "num_negatives": cfg["data"]["num_negatives"], "lora_r": lora.get("r", 16),
            "lora_alpha": lora.get("alpha", 32), "instruction": cfg["model"].get("query_instruction") or ""}


def cases(shapes: list[str]) -> list[dict]:
    """(shape, fine-tuning, gradient checkpointing, shipped config) to run, in order."""
    out = []
    for shape in shapes:
        if shape == "8B":
            out.append({"shape": shape, "finetune": "lora", "checkpointing": True, **shipped("lora_8b")})
        else:
            out.append({"shape": shape, "finetune": "lora", "checkpointing": False, **shipped("lora")})
            out.append({"shape": shape, "finetune": "full", "checkpointing": False, **shipped("full")})
    return out


# ---- data ---------------------------------------------------------------------------------------
def text_pool(limit: int = 4000) -> tuple[list[str], list[str], str]:
    """Questions and answers of the shared Chinese medical QA (the embedded 600-pair sample without it)."""
    from hfemb.data.formats import read_records

    path = DATA if DATA.exists() else REPO / "hfemb" / "resources" / "zh_medical_qa" / "internal_medicine_qa_sample.csv"
    records = read_records(str(path)).records[:limit]
    return [r.query for r in records], [r.positives[0] for r in records], str(path)


def batches(model, questions, answers, setting: dict, batch: int, count: int, seed: int) -> list[tuple]:
    """``count`` training batches (padded [B, Tq] / [B*(1+N), Td] ids and masks) drawn at random."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        idx = rng.sample(range(len(questions)), batch)
        docs = []
        for i in idx:
            docs.append(answers[i])
            docs.extend(answers[j] for j in rng.sample(range(len(answers)), setting["num_negatives"]))
        q = model.tokenize([questions[i] for i in idx], is_query=True, max_length=setting["query_max_len"])
        d = model.tokenize(docs, is_query=False, max_length=setting["passage_max_len"])
        out.append((q["input_ids"], q["attention_mask"], d["input_ids"], d["attention_mask"]))
    return out


# ---- model --------------------------------------------------------------------------------------
def build(shape: str, case: dict, device, dtype, attn: str):
    """An `EmbeddingModel` of the given shape with random weights, LoRA or full, on ``device``."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from hfemb.modeling.loading import format_instruction
    from hfemb.modeling.model import EmbeddingModel
    from hfemb.testing.tiny import ENDOFTEXT_ID, build_qwen_tokenizer
    from hfemb.training.config import QWEN3_LORA_TARGETS

    config = Qwen3Config(**QWEN3_EMBEDDING_CONFIGS[shape], use_cache=False, attn_implementation=attn,
                         pad_token_id=ENDOFTEXT_ID)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no fp32 copy of an 8B model first
    try:
        with torch.device(device):
            backbone = Qwen3Model(config)
    finally:
        torch.set_default_dtype(default)
    if case["finetune"] == "lora":
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(r=case["lora_r"], lora_alpha=case["lora_alpha"],
                                                       lora_dropout=0.0, target_modules=QWEN3_LORA_TARGETS,
                                                       task_type="FEATURE_EXTRACTION"))
    tokenizer = build_qwen_tokenizer()
    tokenizer.padding_side = "left"
    model = EmbeddingModel(backbone, tokenizer, pooling="last",
                           query_prompt=format_instruction(case["instruction"], "") if case["instruction"] else "",
                           max_length=8192)
    if case["checkpointing"]:
        model.activation_checkpointing_enable()
    model.train()
    return model


def set_mode(model, mode: str) -> None:
    from hfemb.modeling.pooling import CHUNK_OVERHEAD_TOKENS

    model.padding_free = mode == "packed"
    model.chunk_overhead_tokens = CHUNK_OVERHEAD_TOKENS if mode == "chunked" else 0


# ---- measuring ----------------------------------------------------------------------------------
class Device:
    """Synchronisation, peak memory and OOM detection for CUDA or the CPU."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch = cuda, torch

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**30
        return common.peak_rss_mb() / 1024  # the process's peak RSS: model, data and library too

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, self.torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_case(model, data, mode: str, dev: Device, warmup: int, grad_cache: int | None, flops_args) -> dict:
    """Time ``len(data) - warmup`` optimizer steps after ``warmup`` untimed ones. Model FLOPs: forward +
    backward of the real tokens (`common.training_flops`: 3x forward); with LoRA the frozen weights get no
    weight gradient, so 2x forward. Recomputation (GradCache's first pass, checkpointing) is not counted."""
    flops_factor = 2 / 3 if model.is_peft else 1.0
    import torch

    from hfemb.training.grad_cache import grad_cache_step
    from hfemb.training.loss import info_nce_loss

    set_mode(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=dev.cuda)
    group = data[0][2].shape[0] // data[0][0].shape[0]
    loss_fn = lambda q, d: info_nce_loss(q, d, group_size=group, temperature=0.05)  # noqa: E731
    durations, tokens, flops, samples, probes = [], 0, 0.0, 0, []
    dev.reset_peak()
    try:
        for step, (qi, qm, di, dm) in enumerate(data):
            qi, qm, di, dm = (t.to(model.device) for t in (qi, qm, di, dm))
            dev.sync()
            start = time.perf_counter()
            if grad_cache:
                inputs = {"query_input_ids": qi, "query_attention_mask": qm, "doc_input_ids": di,
                          "doc_attention_mask": dm}
                grad_cache_step(model, inputs, loss_fn, grad_cache)
            else:
                loss_fn(model(qi, qm), model(di, dm)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dev.sync()
            if step >= warmup:
                durations.append(time.perf_counter() - start)
                lengths = qm.sum(1).tolist() + dm.sum(1).tolist()
                tokens += sum(lengths)
                flops += common.training_flops(lengths, *flops_args) * flops_factor
                samples += qi.shape[0]
                if not dev.cuda:  # what a matmul gets under this moment's load (the machine may be shared)
                    probes.append(common.matmul_gflops(1024, repeats=1) * 1e9)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is expected; anything else is re-raised
        if not dev.is_oom(exc):
            raise
        raise OutOfMemory(str(exc).splitlines()[0][:200]) from None
    finally:
        optimizer = None
        model.zero_grad(set_to_none=True)
    seconds = sum(durations)
    return {"tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds, "flops_per_s": flops / seconds,
            "peak_memory_gb": dev.peak_gb(), "step_seconds": seconds / len(durations), "timed_steps": len(durations),
            "real_tokens_per_step": tokens / len(durations),
            "probe_flops_per_s": statistics.median(probes) if probes else None}


def device_peak(dev: Device, override: float | None) -> tuple[float, str]:
    """(FLOP/s, how it was obtained): the bf16 dense peak of the GPU, or a fp32 matmul probe on the CPU."""
    import torch

    if override:
        return override * 1e12, f"--peak-tflops {override}"
    if dev.cuda:
        name = torch.cuda.get_device_name()
        for fragment, tflops in BF16_PEAK_TFLOPS:
            if fragment in name and tflops:
                return tflops * 1e12, f"{name}: dense bf16 peak {tflops:.0f} TFLOP/s (table in bench_gpu.py)"
        return cuda_matmul_flops(), f"{name}: not in the table; a bf16 8192^3 matmul measured here (pass --peak-tflops)"
    probe = common.matmul_gflops(1024, repeats=8) * 1e9
    return probe, f"CPU: 1024^3 fp32 matmul measured here ({probe / 1e9:.1f} GFLOP/s), {torch.get_num_threads()} thread(s)"


def cuda_matmul_flops(n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a bf16 n^3 matmul on the current CUDA device (best of ``repeats``)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def fits(shape: str, case: dict, dev: Device) -> str | None:
    """None if the model's weights (+ full fine-tuning's gradients and AdamW state) fit, else why not."""
    if not dev.cuda:
        return None
    import torch

    c = QWEN3_EMBEDDING_CONFIGS[shape]
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    attn = h * c["head_dim"] * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    params = c["vocab_size"] * h + n * (attn + 3 * h * i)
    need = params * (2 if case["finetune"] == "lora" else 2 + 2 + 8 + 4)  # bf16 weights (+ grads, fp32 AdamW, master)
    free, _ = torch.cuda.mem_get_info()
    if need > 0.9 * free:
        return f"needs ~{need / 2**30:.0f} GiB for weights{' and optimizer' if case['finetune'] == 'full' else ''}, " \
               f"{free / 2**30:.0f} GiB free"
    return None


def table(results: list[dict]) -> str:
    lines = ["| model | fine-tuning | batch | mode | tokens/s | samples/s | MFU | peak memory (GiB) | step (s) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        label = f"{r['shape']}" + (" + grad ckpt" if r["checkpointing"] else "")
        if "error" in r:
            lines.append(f"| {label} | {r['finetune']} | {r['batch']} | {r['mode']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {label} | {r['finetune']} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['samples_per_s']:.2f} | {r['mfu']:.1%} | {r['peak_memory_gb']:.2f} | {r['step_seconds']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results (the table is printed)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(QWEN3_EMBEDDING_CONFIGS),
                        help="default: 0.6B 8B with CUDA, tiny without")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 6 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 2 GPU, 1 CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, if not in the table")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-grad-cache", action="store_true", help="skip the GradCache cases")
    parser.add_argument("--threads", type=int, default=None, help="CPU only: torch threads (default 1)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step for every case (default: the "
                        "shipped configs' per_device_train_batch_size on CUDA, 4 on the CPU)")
    parser.add_argument("--max-len", type=int, default=None, help="cap on the configs' query/passage max lengths "
                        "(default: none on CUDA, 128 on the CPU)")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:  # 1 thread by default: OpenMP threads spin badly on a shared, oversubscribed CPU
        torch.set_num_threads(args.threads or 1)
    dev = Device(cuda)
    shapes = args.shapes or (["0.6B", "8B"] if cuda else ["tiny"])
    steps = args.steps or (6 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    batch_override = args.batch or (None if cuda else 4)
    max_len = args.max_len or (None if cuda else 128)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        import flash_attn  # noqa: F401  (optional: the varlen kernels for the packed mode)
        packed_attn = "flash_attention_2" if cuda else "sdpa"
    except ImportError:
        packed_attn = "sdpa"
    peak, peak_source = device_peak(dev, args.peak_tflops)
    print(f"peak assumed for MFU: {peak / 1e12:.3f} TFLOP/s ({peak_source})", flush=True)
    questions, answers, data_path = text_pool()
    started, results = time.time(), []
    for case in cases(shapes):
        shape = case["shape"]
        if batch_override:
            case["batch"] = batch_override
        if max_len:
            case["query_max_len"] = min(case["query_max_len"], max_len)
            case["passage_max_len"] = min(case["passage_max_len"], max_len)
        why = fits(shape, case, dev)
        if why:
            print(f"skipping {shape} {case['finetune']}: {why}", flush=True)
            results.append({**case, "mode": "-", "error": f"skipped: {why}"})
            continue
        model = None
        try:
            model = build(shape, case, device, dtype, "sdpa")
            flops_args = common.per_token_linear_params(model._hf_model())[:3]
            plan = [(mode, case["batch"], None) for mode in args.modes]
            if not args.no_grad_cache:
                plan.append(("packed", GRAD_CACHE_FACTOR * case["batch"], case["batch"]))
            for mode, batch, grad_cache in plan:
                attn = packed_attn if mode == "packed" else "sdpa"
                try:
                    model._hf_model().set_attn_implementation(attn)  # checks that flash_attn is usable
                except (ImportError, ValueError, RuntimeError) as exc:
                    print(f"{attn} unavailable ({str(exc).splitlines()[0][:150]}); packed batches use sdpa", flush=True)
                    packed_attn = attn = "sdpa"
                    model._hf_model().set_attn_implementation(attn)
                data = batches(model, questions, answers, case, batch, warmup + steps, seed=batch)  # same per mode
                row = {**case, "batch": batch, "mode": mode + (f" + GradCache (mini-batch {grad_cache})"
                                                                if grad_cache else ""), "attention": attn}
                try:
                    r = run_case(model, data, mode, dev, warmup, grad_cache, flops_args)
                    # CPU: against the matmul probe timed between the steps of this case (cancels the load)
                    row.update(r, mfu=r["flops_per_s"] / (r["probe_flops_per_s"] or peak))
                except OutOfMemory as exc:
                    row["error"] = "out of memory"
                    print(f"{shape} {case['finetune']} {row['mode']} batch {batch}: out of memory ({exc})", flush=True)
                results.append(row)
                if "error" not in row:
                    print(f"{shape:5s} {case['finetune']:4s} {row['mode']:38s} batch {batch:3d}: "
                          f"{row['tokens_per_s']:10,.0f} tokens/s  {row['samples_per_s']:7.2f} samples/s  "
                          f"MFU {row['mfu']:6.1%}  peak {row['peak_memory_gb']:.2f} GiB", flush=True)
        except Exception as exc:  # noqa: BLE001 - building the model itself can run out of memory
            if not dev.is_oom(exc):
                raise
            print(f"skipping {shape} {case['finetune']}: out of memory while building the model", flush=True)
            results.append({**case, "mode": "-", "error": "out of memory while building the model"})
        finally:
            del model
            if cuda:
                torch.cuda.empty_cache()
    md = table(results)
    print("\n" + md)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
              "peak_flops": peak, "peak_source": peak_source, "packed_attention": packed_attn, "data": data_path,
              "steps": steps, "warmup": warmup, "seconds": round(time.time() - started, 1),
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "command": "python bench/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "results": results, "table": md}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"\nwritten: {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
