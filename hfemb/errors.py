"""Errors hfemb reports to users as one clear line (no traceback from the CLI)."""

from __future__ import annotations


class HfembError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class DataError(HfembError, ValueError):
    """Bad input data, located by file, line (1-based) and field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = ":".join(str(x) for x in (path, line) if x is not None)
        parts = [p for p in (where, f"field '{field}'" if field else None) if p]
        super().__init__((", ".join(parts) + ": " if parts else "") + message)


class ConfigError(HfembError, ValueError):
    """Bad configuration (unknown key, wrong type, impossible combination)."""
