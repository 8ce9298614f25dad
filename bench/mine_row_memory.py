"""Peak memory of `hfemb mine` against the size of its largest row (issue 17: a 4 MB line took 1.5 GB).

    python bench/mine_row_memory.py [--sizes 0,0.25,0.5,1,4]

Each size (MiB) is one `hfemb mine` process (jieba, corpus mode, 1 worker, no token cache) on 200 real
Chinese QA rows from the embedded sample plus one answer of that size made of repeated sample text; its peak
RSS is printed with the ratio to the run without a big row (size 0), and the extra MiB per MiB of row. Sizes
above the row limit (1 MiB) are run with HFEMB_MAX_ROW_BYTES raised, and once without, to show the refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ZH_SAMPLE  # noqa: E402

RUN = ("import resource, sys\n"
       "from hfemb.cli import main\n"
       "code = main(sys.argv[1:])\n"
       "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
       "sys.exit(code)\n")


def make_input(folder: Path, mib: float, field: str = "pos_doc") -> Path:
    from hfemb.data.formats import read_records

    records = read_records(str(ZH_SAMPLE)).records[:200]
    rows = [{"query": r.query, "pos_doc": r.positives[0]} for r in records]
    if mib:
        text = "".join(r.positives[0] for r in records)
        target = int(mib * (1 << 20))
        big = (text * (target // len(text.encode()) + 1))[: target // 3]  # ~3 bytes a character
        rows.append({"query": "一个很长的问题", "pos_doc": "一个回答", field: big})
    path = folder / f"rows_{mib}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run(path: Path, out: Path, limit: int | None) -> tuple[int, float | None, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if limit:
        env["HFEMB_MAX_ROW_BYTES"] = str(limit)
    proc = subprocess.run([sys.executable, "-c", RUN, "mine", "--input", str(path), "--output", str(out),
                           "--no-cache", "--workers", "1", "--allow-empty"], capture_output=True, text=True, env=env)
    peak = next((int(line.split()[1]) / 1024 for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")), None)
    error = next((line for line in proc.stderr.splitlines() if "error:" in line), "")
    return proc.returncode, peak, error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,0.25,0.5,1,4", help="row sizes in MiB, comma-separated")
    parser.add_argument("--field", choices=("pos_doc", "query"), default="pos_doc",
                        help="which text of the big row is big: the answer (a corpus document) or the query")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f}; the big text is the row's {args.field}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = None
        print(f"{'row MiB':>8s} {'file MiB':>9s} {'exit':>4s} {'peak RSS MiB':>13s} {'x base':>7s} {'extra/row':>10s}")
        for mib in sorted(set([0.0] + sizes)):
            path = make_input(folder, mib, args.field)
            file_mib = path.stat().st_size / (1 << 20)
            over = mib * (1 << 20) > (1 << 20)
            if over:
                code, _, error = run(path, folder / "out.jsonl", None)
                print(f"{mib:8.2f} {file_mib:9.2f} {code:4d}  refused at the default limit: {error[-90:]}")
            code, peak, error = run(path, folder / "out.jsonl", int(mib * (1 << 20)) + (1 << 20) if over else None)
            if base is None:
                base = peak
            extra = (peak - base) / mib if mib and peak else float("nan")
            print(f"{mib:8.2f} {file_mib:9.2f} {code:4d} {peak:13.0f} {peak / base:7.2f} {extra:10.1f}"
                  + (f"  {error}" if code else "") + ("  (limit raised)" if over else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
