#!/usr/bin/env python
"""Fine-tune an embedding model: `python run_train.py configs/lora.json [section.key=value ...] [--resume]`."""

import sys

from hfemb.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
