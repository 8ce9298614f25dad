"""Test fixtures shipped with the package: the tiny random Qwen3 with the real Qwen BPE, a torchrun launcher."""
