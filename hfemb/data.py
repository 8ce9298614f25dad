"""Training and evaluation data: every format people already have, read into one ``Record``.

(Interface fixed; readers/writers are being implemented — see issue 3.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Record:
    """One query with its documents, whatever file format it came from.

    * ``positives``: relevant documents (at least one for training rows).
    * ``negatives``: irrelevant documents given by the file (mined or labelled 0), in file order.
    * ``candidates``: the labelled pool as given (``(text, label)``; label > 0 is relevant), for
      formats that have one (``documents`` / ``content_private`` pools, pair rows). Positives and
      negatives of a pool record are derived from it.
    * ``source``: ``"path:line"`` of the row, for error messages and reports.
    * ``extra``: anything else worth carrying (``id``, ``mining`` info of mined rows, ...).
    """

    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    candidates: list[tuple[str, int]] = field(default_factory=list)
    source: str | None = None
    extra: dict = field(default_factory=dict)
