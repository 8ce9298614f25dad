"""`MultiNegCollator`: training rows -> one query batch and one document batch, padded to their longest text.

A row is ``{"query": str, "positive": str, "negatives": [str] * num_negatives}``, optionally with
``"query_positives": [str]`` (every known positive of its query: none of them counts as its negative) and
``"query_prompt": str | None`` (several datasets: its dataset's query prompt, "" = none, None = the model's;
documents get it too when ``symmetric``).
Documents are ordered
``[pos_0, neg_0_1 .. neg_0_N, pos_1, ...]`` (B*(1+N) rows), matching `hfemb.training.loss.info_nce_loss`.
Batches never carry a ``labels`` key: with one, HF Trainer would not divide the loss by the
gradient-accumulation steps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from hfemb.errors import DataError


def length_of(feature: dict[str, Any]) -> int:
    """Cheap length proxy of a training row for length-grouped sampling: characters of its longest
    document (the document batch dominates the cost; ~1 token per Chinese character, ~4 English
    characters per token -- only the order matters)."""
    return max(len(feature["positive"]), *(len(n) for n in feature.get("negatives") or [""]))


def text_id(text: str) -> int:
    """63-bit id of a text (blake2b): equal in every process and batch, so false-negative masking also works
    on documents gathered from other processes (a collision among 2^63 values is negligible)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _where(feature: dict[str, Any], position: int) -> str:
    for key in ("source", "id", "line"):
        if feature.get(key) is not None:
            return f"training row {feature[key]}"
    return f"training row {position} of the batch"


@dataclass
class MultiNegCollator:
    model: Any  # hfemb.modeling.model.EmbeddingModel: its `tokenize` adds prompts and the end token, pads per pooling
    query_max_len: int = 64
    passage_max_len: int = 512
    num_negatives: int = 3
    symmetric: bool = False  # model.symmetric: a row's own query prompt goes on its documents too

    def _check(self, feature: dict[str, Any], position: int) -> None:
        where = _where(feature, position)
        for key in ("query", "positive"):
            if not isinstance(feature.get(key), str):
                raise DataError(f"{where}: expected a string, got {type(feature.get(key)).__name__}", field=key)
        negatives = feature.get("negatives")
        if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
            raise DataError(f"{where}: expected a list of strings", field="negatives")
        if len(negatives) != self.num_negatives:
            raise DataError(f"{where}: has {len(negatives)} negatives, expected num_negatives={self.num_negatives}",
                            field="negatives")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        for position, feature in enumerate(features):
            self._check(feature, position)
        queries = [f["query"] for f in features]
        docs = [text for f in features for text in (f["positive"], *f["negatives"])]  # B*(1+N)
        doc_text_ids = torch.tensor([text_id(t) for t in docs], dtype=torch.long)
        query_text_ids = torch.tensor([text_id(t) for t in queries], dtype=torch.long)
        known = [[text_id(t) for t in dict.fromkeys([f["positive"], *(f.get("query_positives") or [])])]
                 for f in features]  # every known positive of each query, its own first
        width = max(map(len, known))
        query_positive_ids = torch.tensor([k + [-1] * (width - len(k)) for k in known], dtype=torch.long)
        teacher = [f.get("teacher_scores") for f in features]
        if any(t is not None for t in teacher) and not all(
                isinstance(t, (list, tuple)) and len(t) == 1 + self.num_negatives for t in teacher):
            bad = next(i for i, t in enumerate(teacher) if not isinstance(t, (list, tuple))
                       or len(t) != 1 + self.num_negatives)
            raise DataError(f"{_where(features[bad], bad)}: expected {1 + self.num_negatives} teacher scores "
                            "(positive, then each negative) like the other rows", field="teacher_scores")
        prompts = [f.get("query_prompt") for f in features]  # per-dataset instructions (data.train_files)
        if all(p is None for p in prompts):
            prompts = None
        q = self.model.tokenize(queries, is_query=True, max_length=self.query_max_len, prompts=prompts)
        doc_prompts = [p for p in prompts for _ in range(1 + self.num_negatives)] if prompts and self.symmetric else None
        d = self.model.tokenize(docs, is_query=False, max_length=self.passage_max_len, prompts=doc_prompts)
        return {
            "query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],  # [B, Tq]
            "doc_input_ids": d["input_ids"], "doc_attention_mask": d["attention_mask"],  # [B*(1+N), Td]
            "doc_text_ids": doc_text_ids,  # [B*(1+N)] equal id <=> identical text, in every process
            "query_text_ids": query_text_ids,  # [B] the same for queries (query-query negatives, sibling positives)
            "query_positive_ids": query_positive_ids,  # [B, P] ids of every known positive of each query, -1 = none
            **({"teacher_scores": torch.tensor(teacher, dtype=torch.float32)}  # [B, 1+N] (distillation)
               if teacher[0] is not None else {}),
        }
