"""The dtype names hfemb accepts wherever a model is loaded or saved (training config, eval settings, the
``--dtype`` flags of ``hfemb eval`` / ``merge`` / ``serve``); light on purpose: no torch import."""

from __future__ import annotations

from hfemb.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bf16 on a CUDA GPU that supports it, else fp32


def check_dtype(value, name: str = "dtype") -> str:
    """``value`` if it is one of ``DTYPES``, else a ``ConfigError`` naming ``name``."""
    if value not in DTYPES:
        raise ConfigError(f"{name} must be auto, float32, bfloat16 or float16, got {value!r}")
    return value
