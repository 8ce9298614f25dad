"""Per-epoch redraw of each training row's negatives from its candidate pools (``data.redraw_negatives``).

A mined row keeps ``num_negatives`` negatives, but `hfemb mine` also writes the pools they were drawn from
(``negative_candidates``: the hard pool and the easy pool). Epoch 0 trains on the mined negatives, exactly as
written; every later epoch draws each row's hard and easy negatives afresh from those pools, with the same
counts in the same positions (seeded by ``(seed, epoch, row)``, so a run and its resume repeat). SimANS draws
(below) start at epoch 0: the mined negatives were not chosen by the teacher. A row with more negatives than
``num_negatives`` (FlagEmbedding's ``neg`` lists) is resampled from all of them each epoch, as FlagEmbedding
resamples its lists. With ``data.pool_negatives`` a row instead draws that many negatives from everything its
record offers, pools and negatives together, repeated when short (`record_pool`, `pooled_draw`). Teacher scores
follow the drawn texts (``negative_candidate_scores`` / ``neg_scores``); a row whose pools lack them keeps its
mined negatives.

Draws are uniform, or (``data.redraw_sampling: simans``, rows with teacher scores) weighted towards the
*ambiguous* candidates, those the teacher scores close to the row's positive: weight
exp(-((s_neg - s_pos) / width)^2) (SimANS, Zhou et al. 2022, with cosine scores and ``width`` in cosine units),
drawn without replacement by Gumbel (Efraimidis-Spirakis) keys.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Sequence

import torch

from hfemb.errors import ConfigError, DataError
from hfemb.training.teacher_scores import is_number_list

log = logging.getLogger("hfemb.training.redraw")

REDRAW_KEY = "redraw"  # a training row's {"slots": [[position, ...], ...], "pools": [[text, ...], ...],
# "scores": [[float, ...], ...] | None}: group g fills the negatives at slots[g] from pools[g]


def candidate_pools(extra: dict, source: str | None) -> dict[str, list[str]]:
    """A record's mined pools, ``negative_candidates`` ({kind: [text, ...]}; {} without), checked."""
    pools = extra.get("negative_candidates") or {}
    if not isinstance(pools, dict) or not all(isinstance(p, list) and all(isinstance(t, str) for t in p)
                                              for p in pools.values()):
        raise DataError("expected {kind: [text, ...]} (hfemb mine's hard and easy pools)", source,
                        field="negative_candidates")
    return pools


def pool_teacher_scores(scores, kind: str, pool: list[str], source: str | None) -> list[float]:
    """The teacher's score of each text of a record's ``kind`` pool, from its ``negative_candidate_scores``
    (``scores``), checked: one number per text."""
    kind_scores = scores.get(kind) if isinstance(scores, dict) else None
    if not is_number_list(kind_scores, len(pool)):
        raise DataError(f"expected {len(pool)} numbers for the {kind!r} pool, got {kind_scores!r}"[:200], source,
                        field="negative_candidate_scores")
    return [float(v) for v in kind_scores]


def mined_pools_spec(extra: dict, source: str | None, negatives: list[str], with_teacher: bool,
                     positives: Sequence[str] = (), texts: dict[str, str] | None = None) -> dict | None:
    """The redraw spec of a mined row (``extra``: its other fields) that keeps all of its ``negatives``, from
    ``negative_candidates`` and ``mining.kinds``; None when it has no pools (or, ``with_teacher``, no teacher
    scores of them). A pool must hold the row's negatives of its kind. Known ``positives`` of the query are
    left out of the pools (unless the mined row already has them as negatives); ``texts``: one shared string
    object per distinct text (the pools repeat texts across rows)."""
    pools = candidate_pools(extra, source)
    if not pools:
        return None
    mining = extra.get("mining")
    kinds = mining.get("kinds") if isinstance(mining, dict) else None
    if not isinstance(kinds, list) or len(kinds) != len(negatives):
        raise DataError(f"negative_candidates needs mining.kinds with one kind per negative ({len(negatives)}), "
                        f"got {kinds!r}"[:200], source, field="mining.kinds")
    scores = extra.get("negative_candidate_scores") if with_teacher else None
    if with_teacher and scores is None:
        return None  # teacher scores of the mined negatives only: keep them
    spec = {"slots": [], "pools": [], "scores": [] if with_teacher else None}
    known = set(positives)
    for kind, pool in pools.items():
        slots = [i for i, k in enumerate(kinds) if k == kind]
        if not slots or not set(negatives[i] for i in slots) <= set(pool) or len(set(pool)) < len(slots):
            raise DataError(f"the {kind!r} pool ({len(pool)} texts) does not hold the row's {len(slots)} {kind} "
                            "negatives", source, field="negative_candidates")
        keep = [k for k, t in enumerate(pool) if t not in known or t in negatives]
        if with_teacher:
            kind_scores = pool_teacher_scores(scores, kind, pool, source)
            spec["scores"].append([kind_scores[k] for k in keep])
        spec["slots"].append(slots)
        spec["pools"].append([pool[k] if texts is None else texts.setdefault(pool[k], pool[k]) for k in keep])
    return spec


def record_pool(extra: dict, source: str | None, negatives: Sequence[str], neg_scores: Sequence[float] | None,
                positives: Sequence[str] = ()) -> tuple[list[str], list[float] | None]:
    """Every negative a record offers, once each, for `pooled_draw`: its mined pools (``negative_candidates``, kind
    by kind, hard and easy together) then its ``negatives``; a known positive only if it is one of the
    ``negatives``. With ``neg_scores`` (the teacher's, one per negative), also each text's teacher score; the pools
    count only with their own scores (``negative_candidate_scores``)."""
    known = set(positives)
    texts: dict[str, float | None] = {}
    pools = candidate_pools(extra, source)
    scores = extra.get("negative_candidate_scores") if neg_scores is not None else None
    if neg_scores is not None and scores is not None and not isinstance(scores, dict):
        raise DataError(f"expected {{kind: [score, ...]}} (hfemb mine --teacher), got {scores!r}"[:200], source,
                        field="negative_candidate_scores")
    if neg_scores is None or scores is not None:
        for kind, pool in pools.items():
            kind_scores = None if neg_scores is None else pool_teacher_scores(scores, kind, pool, source)
            for k, text in enumerate(pool):
                if text not in known or text in negatives:
                    texts.setdefault(text, None if kind_scores is None else kind_scores[k])
    for k, text in enumerate(negatives):
        texts.setdefault(text, None if neg_scores is None else float(neg_scores[k]))
    return list(texts), (None if neg_scores is None else [float(v) for v in texts.values()])


def pooled_draw(pool: list[str], scores: list[float] | None, count: int, rng: random.Random
                ) -> tuple[list[str], list[float] | None, dict]:
    """``count`` negatives of a row drawn from ``pool`` (`record_pool`), with their teacher ``scores``, and the
    redraw spec that draws them again each epoch: one group, every slot. A pool smaller than ``count`` is repeated
    (FlagEmbedding's ``negs * ceil(n / len(negs))``), so a text comes at most ceil(count / len(pool)) times. The
    first draw is uniform (epoch 0 of uniform redraws; SimANS redraws epoch 0 by the teacher)."""
    repeats = -(-count // len(pool))
    pool, scores = pool * repeats, (None if scores is None else scores * repeats)
    picked = sorted(rng.sample(range(len(pool)), count))
    spec = {"slots": [list(range(count))], "pools": [pool], "scores": None if scores is None else [scores]}
    return [pool[k] for k in picked], (None if scores is None else [scores[k] for k in picked]), spec


def resample_spec(negatives: Sequence[str], num_negatives: int, neg_scores: list[float] | None) -> dict:
    """The redraw spec of a row sampling ``num_negatives`` of a record's longer ``negatives`` list (all slots,
    one pool: the whole list; ``neg_scores``: the teacher's, one per negative)."""
    return {"slots": [list(range(num_negatives))], "pools": [list(negatives)],
            "scores": None if neg_scores is None else [[float(s) for s in neg_scores]]}


def simans_log_weights(scores: Sequence[float], positive: float, width: float) -> list[float]:
    """log SimANS sampling weight of each candidate, -((score - positive) / width)^2: largest for the candidates
    the teacher scores like the positive (ambiguous ones), far below for the far easier and the far harder
    (logs: a narrow width never underflows to all-zero weights)."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return [-(((s - positive) / width) ** 2) for s in scores]


def weighted_sample(rng: random.Random, choices: Sequence[int], log_weights: Sequence[float], k: int) -> list[int]:
    """``k`` of ``choices`` without replacement, each draw with probability proportional to its weight among
    those left: the ``k`` largest Gumbel keys log w - log(E), E ~ Exp(1) (Efraimidis-Spirakis in logs; a weight
    of 0, log -inf, comes last)."""
    keys = []
    for j, lw in enumerate(log_weights):
        e = -math.log(1.0 - rng.random())  # Exp(1)
        keys.append((lw if lw == -math.inf else lw - math.log(e) if e > 0 else math.inf, -j))
    best = sorted(range(len(choices)), key=lambda j: keys[j], reverse=True)[:k]
    return [choices[j] for j in best]


def teacher_scores_are_cosines(rows: Sequence[dict]) -> bool:
    """Whether every teacher score the redraw would weigh by (each row's and its pools') is a finite number in
    [-1, 1], as `hfemb mine --teacher` writes them; reranker logits (FlagEmbedding's pos/neg_scores often are)
    are not, and a SimANS width in cosine units would turn their draws into one fixed pick."""
    def ok(values) -> bool:
        return all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in values)

    for row in rows:
        spec = row.get(REDRAW_KEY)
        if "teacher_scores" in row and not ok(row["teacher_scores"]):
            return False
        if spec is not None and spec.get("scores") is not None and not all(ok(g) for g in spec["scores"]):
            return False
    return True


def draws_by_simans(rows: Sequence[dict], sampling: str) -> bool:
    """Whether the rows are redrawn by SimANS (``data.redraw_sampling``): ``simans``, or ``auto`` when the rows that
    redraw carry teacher scores and every teacher score is a cosine (`teacher_scores_are_cosines`)."""
    with_teacher = any("teacher_scores" in r and REDRAW_KEY in r for r in rows)
    return with_teacher and (sampling == "simans" or sampling == "auto" and teacher_scores_are_cosines(rows))


def simans_width_for(rows: Sequence[dict], sampling: str, width: float) -> float | None:
    """The SimANS width the rows are redrawn with (``data.redraw_sampling`` / ``data.redraw_simans_width``), None for
    uniform draws: ``simans`` needs rows with teacher scores and a redraw spec; ``auto`` uses it only when every
    teacher score is a cosine (`teacher_scores_are_cosines`), with a warning when some is not."""
    with_teacher = any("teacher_scores" in r and REDRAW_KEY in r for r in rows)
    if sampling == "simans" and not with_teacher:
        raise ConfigError("data.redraw_sampling=simans weighs each row's pool by its teacher scores: the training "
                          "rows need them (hfemb mine --teacher) and data.redraw_negatives on, with mined pools")
    simans = draws_by_simans(rows, sampling)
    # under auto, drawing by SimANS is exactly "teacher rows, every score a cosine": no second pass over the scores
    cosines = simans if sampling == "auto" else with_teacher and teacher_scores_are_cosines(rows)
    if with_teacher and not cosines:
        log.warning("data.redraw_sampling=%s: some teacher scores are not cosines in [-1, 1] (reranker logits?); %s",
                    sampling, "drawing uniformly" if sampling == "auto" else
                    "data.redraw_simans_width is in the scores' own units")
    return width if simans else None


def redrawn(row: dict, seed: int, epoch: int, index: int, simans_width: float | None = None) -> dict:
    """``row`` with its negatives (and teacher scores) redrawn for ``epoch``; the row itself without a spec and,
    for uniform draws, at epoch 0 (the mined negatives are already a uniform draw of the pools). SimANS draws
    (``simans_width`` and teacher scores, the row's and its pools', weighed by `simans_log_weights`) start at
    epoch 0: the mined negatives were not chosen by the teacher. Each group draws len(slots) distinct texts of
    its pool, kept in pool order."""
    spec = row.get(REDRAW_KEY)
    if spec is None:
        return row
    weighted = simans_width is not None and "teacher_scores" in row and spec["scores"] is not None
    if not epoch and not weighted:
        return row
    rng = random.Random(f"{seed}/{epoch}/{index}")
    negatives = list(row["negatives"])
    teacher = list(row["teacher_scores"]) if "teacher_scores" in row else None
    for g, (slots, pool) in enumerate(zip(spec["slots"], spec["pools"])):
        first: dict[str, int] = {}
        for k, text in enumerate(pool):
            first.setdefault(text, k)
        choices = list(first.values()) if len(first) >= len(slots) else range(len(pool))  # distinct texts if possible
        if weighted:
            log_weights = simans_log_weights([spec["scores"][g][k] for k in choices], teacher[0], simans_width)
            picked = weighted_sample(rng, list(choices), log_weights, len(slots))
        else:
            picked = rng.sample(choices, len(slots))
        for slot, k in zip(slots, sorted(picked)):
            negatives[slot] = pool[k]
            if teacher is not None and spec["scores"] is not None:
                teacher[1 + slot] = spec["scores"][g][k]
    out = {**row, "negatives": negatives}
    if teacher is not None:
        out["teacher_scores"] = teacher
    return out


class RedrawnRows(torch.utils.data.Dataset):
    """The training rows as the Trainer's dataset: ``rows[i]`` redrawn for the current epoch (``set_epoch``,
    which accelerate's DataLoaderShard forwards from the Trainer; ``simans_width``: see `redrawn`). Iterating
    yields the rows as stored (their query and dataset, which samplers read, are the same in every epoch)."""

    def __init__(self, rows: list[dict], seed: int, simans_width: float | None = None):
        self.rows, self.seed, self.epoch, self.simans_width = rows, seed, 0, simans_width

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return redrawn(self.rows[index], self.seed, self.epoch, index, self.simans_width)

    def __iter__(self):
        return iter(self.rows)
