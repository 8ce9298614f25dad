#!/usr/bin/env python
"""Threshold-sweep F1 evaluation: `python run_eval.py --data test.jsonl --thresholds 0.4:0.7` (= `hfemb eval`)."""

import sys

from hfemb.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
