"""Training rows of a run: records read (and mined, cached) per file, turned into query/positive/negatives rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from operator import itemgetter
from pathlib import Path
from typing import Any

from hfemb.data.formats import read_records
from hfemb.data.records import ColumnMap, Record
from hfemb.data.splits import split_by_query
from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import write_json, write_jsonl
from hfemb.mining.mine import MODES as MINING_MODES, MiningConfig, mine, report_beside
from hfemb.modeling.loading import format_instruction
from hfemb.training.config import (POOL_NEGATIVES_AUTO, POOL_NEGATIVES_AUTO_SIMANS, DataConfig, TrainConfig,
                                   TrainFileSpec, train_file_specs)
from hfemb.training.redraw import (REDRAW_KEY, draws_by_simans, mined_pools_spec, pooled_draw, record_pool,
                                   resample_spec)
from hfemb.training.teacher_scores import has_teacher_scores, row_teacher_scores


def rows_from_records(records: list[Record], num_negatives: int, seed: int, redraw: bool = True,
                      pool_negatives: int = 0) -> tuple[list[dict], dict]:
    """Training rows ``{"query","positive","negatives","query_positives"}``, one per (query, positive)
    (``query_positives``: every positive of the query, shared by its rows; none counts as its negative).
    A record with exactly ``num_negatives`` negatives (a mined file) keeps them in order; one with more gets a
    seeded sample (as FlagEmbedding samples its ``neg`` lists); rows short of negatives are dropped and counted.
    With ``pool_negatives`` a row instead draws that many from all its record's candidates (`record_pool`,
    `pooled_draw`).
    A row that can draw other negatives in later epochs (mined pools, or a longer list) carries its
    `hfemb.training.redraw` spec under ``REDRAW_KEY`` (``redraw=False``: none, pools unread)."""
    rows, short, texts = [], 0, {}
    known: dict[str, list[str]] = {}  # query -> all its positives (records of one query may repeat it)
    for rec in records:
        known.setdefault(rec.query, [])
        known[rec.query].extend(p for p in rec.positives if p not in known[rec.query])
    for i, rec in enumerate(records):
        negs = rec.negatives
        if len(negs) < num_negatives or not negs and pool_negatives:
            short += len(rec.positives)
            continue
        for j, pos in enumerate(rec.positives):
            # [1 + len(negs)] (hfemb mine --teacher, or FlagEmbedding's pos/neg_scores)
            teacher = row_teacher_scores(rec.extra, rec.source, j, range(len(negs)), len(rec.positives), len(negs))
            spec = None
            if pool_negatives:  # drawn from the whole pool, every slot
                pool, pool_scores = record_pool(rec.extra, rec.source, negs, None if teacher is None else teacher[1:],
                                                known[rec.query])
                negatives, neg_scores, pooled_spec = pooled_draw([texts.setdefault(t, t) for t in pool], pool_scores,
                                                                 pool_negatives, random.Random(f"{seed}/{i}/{j}/pool"))
                if redraw:
                    spec = pooled_spec
            else:
                picked = range(len(negs)) if len(negs) == num_negatives else \
                    random.Random(f"{seed}/{i}/{j}").sample(range(len(negs)), num_negatives)  # = sample(negs, n)
                negatives = [negs[k] for k in picked]
                neg_scores = None if teacher is None else [teacher[1 + k] for k in picked]
                if redraw and num_negatives:
                    spec = mined_pools_spec(rec.extra, rec.source, negs, teacher is not None, known[rec.query],
                                            texts) if len(negs) == num_negatives else \
                        resample_spec(negs, num_negatives, rec.extra.get("neg_scores") if teacher is not None else None)
            row = {"query": rec.query, "positive": pos, "negatives": negatives, "query_positives": known[rec.query]}
            if teacher is not None:
                row["teacher_scores"] = teacher[:1] + neg_scores  # [1 + N]
            if spec is not None:
                row[REDRAW_KEY] = spec
            rows.append(row)
    return rows, {"rows": len(rows), "dropped_short_of_negatives": short}


def pool_negatives_setting(d: DataConfig, simans: bool = False) -> int:
    """Negatives per row drawn from the whole pool (`rows_from_records`): ``data.pool_negatives``; unset (auto),
    `POOL_NEGATIVES_AUTO`, or `POOL_NEGATIVES_AUTO_SIMANS` for rows drawn by SimANS (``simans``, `draws_by_simans`),
    or ``num_negatives`` if more, with ``redraw_negatives`` on and ``num_negatives`` not 0 (`auto_pool_pays` checks
    the rows), else 0."""
    if d.pool_negatives is not None:
        return d.pool_negatives
    auto = POOL_NEGATIVES_AUTO_SIMANS if simans else POOL_NEGATIVES_AUTO
    return max(auto, d.num_negatives) if d.num_negatives and d.redraw_negatives else 0


def auto_pool_pays(rows: list[dict], num_negatives: int) -> bool:
    """Auto's check of rows built with whole-pool draws: some row's pool holds more texts than ``num_negatives``
    (else the draws would only repeat the mined negatives: ``--no-candidates`` files, lists of exactly
    ``num_negatives``)."""
    return any(len(set(r[REDRAW_KEY]["pools"][0])) > num_negatives for r in rows if REDRAW_KEY in r)


def check_teacher_scores(rows: list[dict], cfg: TrainConfig, train_file: str | None = None) -> None:
    """Teacher scores on every training row or on none; an explicit ``loss.distill_weight`` needs them.
    ``train_file``: the file the rows come from (default ``data.train_file``)."""
    train_file = train_file or cfg.data.train_file
    with_scores = sum("teacher_scores" in r for r in rows)
    if 0 < with_scores < len(rows):
        raise ConfigError(f"{train_file}: {with_scores} of {len(rows)} training rows carry teacher scores "
                          "(pos_scores/neg_scores); give them for every row or for none")
    if cfg.loss.distill_loss == "mse" and with_scores:  # cosine targets: reranker logits would be silently wrong
        for line, row in enumerate(rows, 1):
            bad = next((x for x in row["teacher_scores"] if not -1.0 <= float(x) <= 1.0), None)
            if bad is not None:
                raise ConfigError(f"{train_file}: training row {line}: 'teacher_scores' (pos_scores/neg_scores) has "
                                  f"{bad}, outside [-1, 1]: loss.distill_loss=mse needs cosine similarities (e.g. "
                                  "`hfemb mine --teacher`); use distill_loss=kl for reranker scores")
    if cfg.loss.distill_weight and not with_scores:
        raise ConfigError(f"{cfg.source or 'config'}: 'loss.distill_weight' is {cfg.loss.distill_weight} but the "
                          f"rows of {train_file} carry no teacher scores (mine with `hfemb mine --teacher "
                          "MODEL`, or give FlagEmbedding's pos_scores/neg_scores)")


UNRANKED_FORMATS = ("pool", "pairs", "wikiqa", "case_candidates")  # labelled pools: their negatives are not selected yet


def needs_mining(records: list[Record], num_negatives: int, fmt: str = "") -> bool:
    """Mine when some record lacks negatives, or when they are a labelled pool's unranked negatives."""
    return num_negatives > 0 and (fmt in UNRANKED_FORMATS or any(len(r.negatives) < num_negatives for r in records))


def records_digest(records: list[Record]) -> str:
    """sha1 of the records as the miner receives them (every field, in order): whatever changed them --
    the file, ``data.format``, column settings, ``label_threshold``, skipped rows -- changes the digest."""
    h = hashlib.sha1()
    for rec in records:
        h.update(json.dumps(dataclasses.asdict(rec), sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def mine_cached(records: list[Record], source_file: str, mining: dict, num_negatives: int, cache_dir: Path) -> tuple[list[Record], dict]:
    """Mine ``records`` with `hfemb.mining.mine.mine`, cached on disk by (the records read from ``source_file``,
    mining settings): another ``data.format``, column mapping or ``label_threshold`` mines again."""
    settings = {**(mining or {}), "num_negatives": num_negatives}
    settings.setdefault("mode", "pool" if any(r.candidates for r in records) else "corpus")
    try:
        config = MiningConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"mining section: {exc}") from None
    key = hashlib.sha1(json.dumps([records_digest(records), dataclasses.asdict(config)], sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir / f"mined-{key}.jsonl"
    report_file = cache_dir / f"mined-{key}.report.json"
    if cached.exists() and report_file.exists():
        report = json.loads(report_file.read_text())
        report["cache"] = str(cached)
        return read_records(str(cached)).records, report
    result = mine(records, config)
    write_jsonl(cached, result.rows)
    write_json(report_file, result.report)
    return read_records(str(cached)).records, {**result.report, "cache": str(cached)}


def record_mining_mode(record: Record) -> str | None:
    """The ``mining.mode`` a mined row names (`hfemb mine` writes it), or None."""
    mining = record.extra.get("mining")
    mode = mining.get("mode") if isinstance(mining, dict) else None
    return mode if isinstance(mode, str) else None


def mined_mode(records: list[Record], mining_report: dict | None = None, path: str | None = None) -> str | None:
    """How a file's negatives were found, ``"pool"`` or ``"corpus"``: the mode of this run's mining
    (``mining_report``), else the one mode every record's ``mining`` field names (`hfemb mine` output), else, when
    no record names one, that of the report `hfemb mine` wrote beside ``path`` (files mined before rows named it)
    if its row count matches; None otherwise (negatives given some other way, converted files, mixed rows)."""
    if mining_report and mining_report.get("mode") in MINING_MODES:
        return mining_report["mode"]
    named = {record_mining_mode(r) for r in records}
    if len(named) == 1 and next(iter(named)) in MINING_MODES:
        return next(iter(named))
    if named != {None} or not path:
        return None
    try:
        report = report_beside(path)
    except HfembError:  # unreadable: the mode is unknown
        return None
    matches = isinstance(report, dict) and report.get("rows_written") == len(records)
    return report["mode"] if matches and report.get("mode") in MINING_MODES else None


def load_rows(cfg: TrainConfig, path: str, cache_dir: Path, report: dict, name: str,
              fmt: str | None = None, negatives: int | None = None) -> list[dict]:
    """The training rows of one file (``fmt``: its format, default ``data.format``), mined when needed; its
    report goes to ``report[name]``. ``negatives``: the count every row must have (an eval file's rows, shaped like
    the training rows), drawn from each record's pool when it is not ``data.num_negatives``."""
    d = cfg.data
    columns = ColumnMap(query=list(d.query_columns), positive=d.positive_column) if d.query_columns else None
    result = read_records(path, fmt=fmt or d.format, columns=columns, on_error="skip" if d.skip_bad_rows else "raise",
                          label_threshold=d.label_threshold)
    records = result.records
    part: dict[str, Any] = {"file": path, "format": result.format, "records": len(records), "skipped_bad_rows": len(result.skipped)}
    mine_it = d.mine if d.mine is not None else needs_mining(records, d.num_negatives, result.format)
    if mine_it:
        records, part["mining"] = mine_cached(records, path, cfg.mining or {}, d.num_negatives, cache_dir)
    part["mined_mode"] = mined_mode(records, part.get("mining"), path)
    def build(pool_negatives: int) -> tuple[list[dict], dict]:
        return rows_from_records(records, d.num_negatives, int(cfg.training.get("seed", 42)),
                                 redraw=d.redraw_negatives and name != "eval", pool_negatives=pool_negatives)

    # auto's first guess, from the records: teacher scores mean SimANS draws (cosines, checked on the rows below),
    # so that only a file of reranker logits under auto is built twice
    taught = d.redraw_sampling != "uniform" and any(has_teacher_scores(r.extra) for r in records)
    count = pool_negatives_setting(d, simans=taught) if negatives is None else \
        0 if negatives == d.num_negatives else negatives
    rows, counts = build(count)
    if negatives is None and d.pool_negatives is None and count:  # auto: the rows decide
        # nothing more to draw: as mined; SimANS draws: fewer; teacher scores that are not cosines: uniform
        auto = 0 if not auto_pool_pays(rows, d.num_negatives) else \
            pool_negatives_setting(d, simans=draws_by_simans(rows, d.redraw_sampling))
        if auto != count:
            count = auto
            rows, counts = build(count)
    part["pool_negatives"] = count  # 0: as mined
    part.update(counts)
    report[name] = part
    if not rows:
        raise HfembError(f"{path}: no usable {name} rows (each needs a query, a positive and {d.num_negatives} "
                         f"negatives{', at least one' if part['pool_negatives'] else ''})")
    return rows


def dataset_query_prompt(spec: TrainFileSpec) -> str | None:
    """The query prompt of one dataset of ``data.train_files``: None = the model's own, "" = none (``""`` or
    false), else Qwen3-Embedding's ``Instruct: {task}\\nQuery:``."""
    if spec.instruction is None:
        return None
    return format_instruction(spec.instruction, "") if spec.instruction else ""


def load_train_datasets(cfg: TrainConfig, cache_dir: Path, report: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """``data.train_files``: each file read (and mined) on its own, its rows tagged with the dataset's index
    (``"dataset"``) and query prompt (``"query_prompt"``, `dataset_query_prompt`); with ``data.eval_ratio`` (and no
    ``data.eval_file``) a share of each dataset's queries is held out. Returns (train rows, held-out rows);
    ``report["train <name>"]`` describes each dataset."""
    rows: list[dict] = []
    held: list[dict] = []
    scored: dict[str, bool] = {}  # file -> its rows carry teacher scores (all or none: check_teacher_scores)
    for index, spec in enumerate(train_file_specs(cfg.data)):
        part = f"train {spec.name}"
        own = load_rows(cfg, spec.file, cache_dir, report, part, fmt=spec.format)
        check_teacher_scores(own, cfg, spec.file)
        scored[spec.file] = any("teacher_scores" in r for r in own)
        if len(set(scored.values())) > 1:  # batches of held-out rows mix datasets: all or none, before more mining
            raise ConfigError(f"data.train_files: teacher scores (pos_scores/neg_scores) in "
                              f"{', '.join(f for f, s in scored.items() if s)} but not in "
                              f"{', '.join(f for f, s in scored.items() if not s)}; give them for every dataset "
                              "or none")
        prompt = dataset_query_prompt(spec)
        own = [{**row, "dataset": index, "query_prompt": prompt} for row in own]
        if cfg.data.eval_ratio and not cfg.data.eval_file:
            try:
                out, own = split_by_query(own, cfg.data.eval_ratio, seed, query=itemgetter("query"))
            except HfembError as exc:
                raise HfembError(f"{spec.file} (data.train_files[{index}]): data.eval_ratio: {exc}") from None
            held.extend(out)
            report[part]["rows_after_eval_split"] = len(own)
        report[part].update({"name": spec.name, "weight": spec.weight, "query_prompt": prompt})
        rows.extend(own)
    return rows, held
