"""Where one hfemb training step spends its time: torch.profiler over a few MultiNegEmbeddingTrainer steps.

    python bench/profile_step.py [--setting wikiqa|zh] [--threads 1] [--steps 3]

Operators are grouped into matmul work (mm/addmm/bmm/linear/attention kernels: what the FLOP count of
``bench_train.py`` covers), element-wise and normalisation work (dropout, GELU/SiLU, LayerNorm/RMSNorm,
softmax, adds, copies), the optimizer, and the rest; the share of each in the profiled steps is printed
with the top operators. Run it after ``bench_train.py`` to see why the real-token FLOP rate is what it is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_train import NUM_NEG, PASSAGE_MAX, QUERY_MAX, hfemb_config, setting_data  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
          "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
          "aten::_scaled_dot_product_attention_math")
OPTIMIZER = ("aten::_fused_adamw_", "aten::_foreach_", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")


def group(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if name.startswith(OPTIMIZER):
        return "optimizer"
    if any(k in name for k in ("embedding",)):
        return "embedding lookup/gradient"
    if any(k in name for k in ("layer_norm", "rms", "gelu", "silu", "softmax", "dropout", "bernoulli", "mul", "add",
                               "div", "copy", "fill", "sum", "where", "pow", "rsqrt", "mean", "cat", "index", "masked",
                               "tanh", "erf", "exp", "neg", "clone", "contiguous")):
        return "element-wise / norms / copies"
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="wikiqa", choices=("wikiqa", "zh"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 unprofiled ones)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from hfemb.training.collator import MultiNegCollator
    from hfemb.training.run_setup import build_model, training_arguments
    from hfemb.training.trainer import MultiNegEmbeddingTrainer

    torch.set_num_threads(args.threads)
    model_path, mined = setting_data(args.setting)
    rows = common.training_rows(mined, NUM_NEG)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = hfemb_config(model_path, mined, tmp, args.batch, 2 + args.steps)
        model = build_model(cfg)
        collator = MultiNegCollator(model=model, query_max_len=QUERY_MAX, passage_max_len=PASSAGE_MAX, num_negatives=NUM_NEG)
        trainer = MultiNegEmbeddingTrainer(model=model, args=training_arguments(cfg, has_eval=False), train_dataset=rows,
                                           data_collator=collator, loss_config=cfg.loss)
        from transformers import TrainerCallback

        class Profiled(TrainerCallback):
            prof = None

            def on_step_end(self, a, state, control, **kw):
                if state.global_step == 2:
                    self.prof = profile(activities=[ProfilerActivity.CPU])
                    self.prof.__enter__()

            def on_train_end(self, a, state, control, **kw):
                if self.prof is not None:
                    self.prof.__exit__(None, None, None)

        cb = Profiled()
        trainer.add_callback(cb)
        trainer.train()
    events = cb.prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[group(e.key)] = groups.get(group(e.key), 0.0) + e.self_cpu_time_total
    print(f"{args.setting}: {args.steps} profiled steps, {total / 1e6:.2f} s of operator time, {args.threads} thread(s)\n")
    print("| group | share of operator time |\n|---|---:|")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t / total:.0%} |")
    print("\n| operator | group | self time (s) | share |\n|---|---|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"| {e.key} | {group(e.key)} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
