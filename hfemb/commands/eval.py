"""`hfemb eval` (= `python run_eval.py`): threshold-sweep F1 of several models, e.g.

    python run_eval.py --data test.jsonl --dev dev.jsonl --thresholds 0.4:0.7

Values come from the command line, else from the JSON config (``--config``, default ``configs/eval.json``
when it exists), else from the built-in defaults. Config keys are the long option names with ``_``
(``batch_size``, ``label_threshold``, ...) plus ``models`` ({name: spec}; the spec ``"latest"`` is the
newest training output under ``train_output_root``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from hfemb.config_fields import check_annotated
from hfemb.data.beir import is_beir_folder
from hfemb.data.cases import case_settings
from hfemb.errors import ConfigError
from hfemb.modeling.dtypes import DTYPES

HELP = "threshold-sweep F1 evaluation of several models (= run_eval.py)"
DEFAULT_CONFIG = Path("configs") / "eval.json"
OUTPUT_FILES = ("results.json", "results.csv", "results.md", "f1_vs_threshold.png", "pr_curves.png",
                "classification.json", "classification.md", "classification_predictions.jsonl",
                "classification_pairs.jsonl", "classification_dev_pairs.jsonl")  # what eval may write
RUN_KEYS = {"data": None, "dev": None, "split_dev": None, "models": None, "output_dir": "eval_output",
            "train_output_root": "output", "thresholds": "0.4:0.7", "split": "test", "corpus": None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", default=None, metavar="JSON", help=f"settings file (default: {DEFAULT_CONFIG} if it exists)")
    a("--data", metavar="FILE", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv: corpus retrieval), "
      "or a labelled eval file: {query, documents:[{content,label}]} JSON/JSONL, pair rows "
      "{text1|query, text2|document, label} (JSON/JSONL/TSV, LCQMC, KUAKE-QQR), WikiQA TSV, or mined training rows "
      "(positive = 1, negatives = 0)")
    a("--split", choices=("train", "dev", "test"), help="BEIR folder as --data: the qrels split evaluated "
      "(default test); the sweep threshold is chosen on qrels/dev.tsv when it exists")
    a("--corpus", metavar="FILE", help="corpus retrieval with hfemb data: --data (and --dev) are queries with their "
      "positives, searched over this corpus (JSONL {text}, one document a line, or a 'name<TAB>text' knowledge base) "
      "plus the judged documents")
    a("--dev", metavar="FILE", help="labelled dev file: each model's threshold is chosen there (best F1) and F1 is "
      "reported on --data at that threshold (without it the threshold is tuned on --data itself: optimistic)")
    a("--split-dev", type=float, metavar="F", help="hold out a fraction F of --data's queries as dev (seeded)")
    a("--model", action="append", metavar="NAME=SPEC", help="model to evaluate (repeatable): a Hub id, a local "
      "folder, a LoRA adapter folder, a training output folder, or openai:MODEL@BASE_URL. Default: base "
      "Qwen3-Embedding-0.6B and 8B and the latest training output. The first model is the reference for ΔF1")
    a("--thresholds", metavar="SPEC", help="START:STOP[:STEP] (step 0.1 by default; STOP included) or a list "
      "0.4,0.45,0.5 (default 0.4:0.7)")
    a("--output-dir", metavar="DIR", help="folder for results.json/.csv/.md and the plots (default eval_output)")
    a("--train-output-root", metavar="DIR", help="where to look for the latest training output (default output)")
    a("--label-threshold", type=int, metavar="N", help="a pair is relevant when label >= N (default 1; KUAKE-QQR: 2)")
    a("--format", dest="data_format", metavar="FMT", help="data format (default auto-detect)")
    a("--skip-bad", dest="on_error", action="store_const", const="skip", help="skip bad data rows (counted)")
    a("--bad-label", choices=("error", "skip"), help="rows with a non-integer label such as 'NA' (default error)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--instruction", metavar="TASK",
                       help="query instruction for ALL models: 'Instruct: TASK\\nQuery:' (default: each model's own)")
    group.add_argument("--no-instruction", dest="instruction", action="store_const", const=False,
                       help="no query prompt for any model")
    group.add_argument("--prompt-name", metavar="NAME",
                       help="query prompt saved under NAME with each model (config_sentence_transformers.json "
                            "'prompts', e.g. a dataset of training's data.train_files); every model must have it "
                            "(base models: pass the same task with --instruction)")
    a("--symmetric", action="store_const", const=True, help="documents get the query prompt too (all models)")
    a("--pooling", choices=("last", "mean", "cls"), help="override pooling (default: each model's own)")
    a("--dtype", choices=DTYPES, help="default auto: bf16 on a bf16 GPU, else fp32")
    a("--quantization", choices=("4bit", "8bit"), help="load local models in 4/8 bit (bitsandbytes, CUDA)")
    a("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    a("--padding-free", choices=("auto", "true", "false"), help="packed batches without padding for rotary "
      "decoders (Qwen3, Qwen2, Llama, Mistral); default auto: on where the model supports them")
    a("--batch-size", type=int, help="texts per forward pass (default 32)")
    a("--max-tokens-per-batch", type=int, help="padded tokens per forward pass (default 16384); texts are sorted by length")
    a("--max-length", type=int, help="tokens per text (default 512)")
    a("--truncate-dim", type=int, help="Matryoshka: keep the first N dimensions (re-normalised)")
    a("--trust-remote-code", action="store_const", const=True, help="allow custom model code")
    a("--search", choices=("exact", "faiss", "faiss-hnsw"), help="corpus retrieval top-100: exact blocked search "
      "(default), faiss (IndexFlatIP: exact too; needs pip install 'hfemb[faiss]') or faiss-hnsw (approximate: "
      "faster on millions of documents, may miss some; see README)")
    a("--cache-dir", help="embedding cache (default $HFEMB_CACHE/embeddings or ~/.cache/hfemb/embeddings)")
    a("--no-cache", dest="use_cache", action="store_const", const=False, help="neither read nor write the cache")
    a("--bootstrap", dest="n_bootstrap", type=int, metavar="N", help="bootstrap resamples of queries (default 1000; 0 = off)")
    a("--threshold-rule", choices=("bagged", "best"), help="the threshold to deploy, chosen on --dev (else on "
      "--data): bagged (default) = median of the best-F1 thresholds of 200 query resamples, steadier on new "
      "queries; best = the argmax of the F1 curve itself")
    a("--seed", type=int, help="seed of the bootstrap and of --split-dev (default 0)")
    a("--api-key-env", metavar="VAR", help="environment variable holding the key for openai: models "
      "(default OPENAI_API_KEY); the key is never printed or written")
    a("--request-batch-size", type=int, help="texts per request to an openai: endpoint (default 64)")
    a("--skip-failed", action="store_const", const=True, help="report and skip a model that fails to load")
    a("--no-plots", dest="plots", action="store_const", const=False, help="do not draw the PNG plots")
    a("--quiet", dest="show_progress", action="store_const", const=False, help="no progress bars")
    cases = parser.add_argument_group("classification over a knowledge base (hfemb.evaluation.classification)")
    cases.add_argument("--classify-knowledge", metavar="FILE", help="knowledge base (TSV 'name<TAB>text' or JSONL "
                       "{name, text}): --data (and --dev) are then case records, each scored against every entry "
                       "(label 1 for its own): the threshold sweep plus top-1/top-5 accuracy (classification.md)")
    cases.add_argument("--query-fields", metavar="F[=NAME],...", help="case fields of the query, as for hfemb convert "
                       "(default chief_complaint=主诉,medical_history=现病史,FDMR=四诊摘要)")
    cases.add_argument("--label-field", metavar="F", help="case field naming its entry (default norm_syndrome)")
    cases.add_argument("--query-template", metavar="T", help="the whole query as a format string over case fields")


def load_config(path: str | Path | None) -> dict:
    """The JSON config as a dict; unknown keys are an error naming them."""
    # lazy (numpy): not loaded for `hfemb eval --help`
    from hfemb.evaluation.settings import EvalSettings

    if path is None:
        if not DEFAULT_CONFIG.is_file():
            return {}
        path = DEFAULT_CONFIG
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    known = set(RUN_KEYS) | {f.name for f in fields(EvalSettings)}
    unknown = sorted(k for k in config if k not in known and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    models = config.get("models")
    if models is not None and (not isinstance(models, dict) or not all(isinstance(v, str) for v in models.values())):
        raise ConfigError(f"{path}: 'models' must be an object {{name: spec}}")
    if models == {}:
        raise ConfigError(f"{path}: 'models' is empty (leave it out for the defaults)")

    types = {f.name: f.type for f in fields(EvalSettings)}
    types.update(data="str | None", dev="str | None", split_dev="float | None", output_dir="str",
                 train_output_root="str", thresholds="str | list[float]", split="str", corpus="str | None")
    for key, value in config.items():
        if key in types:
            if key == "thresholds" and not isinstance(value, str):
                if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in value):
                    continue
                raise ConfigError(f"{path}: 'thresholds' must be a string like \"0.4:0.7\" or a list of numbers, "
                                  f"got {value!r}")
            check_annotated("", key, value, types[key], str(path))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def resolve_models(cli_models: list[str] | None, config_models: dict | None, train_output_root: str) -> dict[str, str]:
    # lazy (numpy): not loaded for `hfemb eval --help`
    from hfemb.evaluation.encoders import default_models, latest_training_output, parse_model_args

    if cli_models:
        return parse_model_args(cli_models)
    if not config_models:
        models = default_models(train_output_root)
        if not any(name.startswith("tuned") for name in models):
            print(f"hfemb eval: no training output with merged/ under {train_output_root!r}; evaluating the base "
                  "models only", file=sys.stderr)
        return models
    models = {}
    for name, spec in config_models.items():
        if spec == "latest":
            run = latest_training_output(train_output_root)
            if run is None:
                print(f"hfemb eval: {name}: no training output with merged/ under {train_output_root!r}; skipped",
                      file=sys.stderr)
                continue
            spec = str(run / "merged")
        models[name] = spec
    return models


def read_retrieval_corpus(path) -> list[str]:
    """``--corpus``: a knowledge base of ``name<TAB>text`` lines (the TCM layout: the texts are the documents),
    else a mining corpus (JSONL ``{text}``, e.g. ``hfemb convert``'s knowledge corpus, or one document a line)."""
    from hfemb.data.cases import read_knowledge
    from hfemb.data.formats import read_corpus

    try:
        head = Path(path).read_text(encoding="utf-8-sig")[:65536]
    except (OSError, UnicodeDecodeError):
        head = ""  # read_corpus reports it
    lines = [line for line in head.split("\n")[:-1] or head.split("\n") if line.strip()]
    if lines and not head.lstrip().startswith(("{", "[")) and all("\t" in line for line in lines):
        return list(read_knowledge(path).values())
    return read_corpus(path)


def load_retrieval_sets(values: dict, settings):
    """(eval set, dev set or None) of a retrieval run: a BEIR folder (dev = qrels/dev.tsv when it exists, unless
    --split-dev or --dev is given) or hfemb records with --corpus."""
    from hfemb.data.beir import read_beir, retrieval_set_from_records
    from hfemb.evaluation.evaluate import read_eval_records

    data, split = values["data"], values["split"]
    if split not in ("train", "dev", "test"):
        raise ConfigError(f"split must be train, dev or test, got {split!r}")
    if is_beir_folder(data):
        if values["corpus"]:
            raise ConfigError(f"--corpus: {data} is a BEIR folder, which has its own corpus.jsonl")
        rset = read_beir(data, split)
        dev_set = None
        if values["dev"]:
            dev_set = read_beir(values["dev"], "dev") if is_beir_folder(values["dev"]) else None
            if dev_set is None:
                raise ConfigError(f"--dev {values['dev']}: with a BEIR folder as --data, --dev must be one too")
        elif not values["split_dev"] and split != "dev" and (Path(data) / "qrels" / "dev.tsv").is_file():
            dev_set = read_beir(data, "dev")
        return rset, dev_set
    corpus = read_retrieval_corpus(values["corpus"])
    records = read_eval_records(data, settings).records
    rset = retrieval_set_from_records(records, corpus, path=data, corpus_path=values["corpus"])
    dev_set = None
    if values["dev"]:
        dev_records = read_eval_records(values["dev"], settings).records
        joint = retrieval_set_from_records(records + dev_records, corpus, path=data, corpus_path=values["corpus"])
        # one corpus for both: the judged documents of dev join it too
        texts = dict(zip(joint.query_ids, joint.query_texts))
        eval_q = {t for t in rset.query_texts}
        eval_ids = [q for q in joint.query_ids if texts[q] in eval_q]
        dev_ids = [q for q in joint.query_ids if texts[q] not in eval_q]
        if not dev_ids:
            raise ConfigError(f"--dev {values['dev']}: every dev query is also an eval query")
        rset, dev_set = joint.subset(eval_ids, "eval"), joint.subset(dev_ids, "dev")
        rset.stats.update(path=data)
        dev_set.stats.update(path=values["dev"])
    return rset, dev_set


def run(args) -> int:
    # lazy (numpy): not loaded for `hfemb eval --help`
    from hfemb.evaluation.evaluate import evaluate
    from hfemb.evaluation.settings import EvalSettings

    config = load_config(args.config)
    cli = {k: v for k, v in vars(args).items() if v is not None and not k.startswith("_")
           and k not in ("config", "command", "model")}
    values = {**RUN_KEYS, **{k: v for k, v in config.items() if k != "models"}, **cli}
    if not values["data"]:
        raise ConfigError("no eval data: pass --data FILE (or set 'data' in the config)")
    from hfemb.io_utils import check_output

    check_output(values["output_dir"], inputs=[values["data"], values["dev"], values["corpus"],
                                               getattr(args, "classify_knowledge", None)],
                 option="--output-dir", folder=True, files=OUTPUT_FILES)  # before loading any model
    setting_names = {f.name for f in fields(EvalSettings)}
    settings = EvalSettings(**{k: v for k, v in values.items() if k in setting_names})
    models = resolve_models(args.model, config.get("models"), values["train_output_root"])
    if getattr(args, "classify_knowledge", None):
        # lazy (numpy): not loaded for `hfemb eval --help`
        from hfemb.evaluation.classification import evaluate_classification

        evaluate_classification(models, values["data"], args.classify_knowledge, dev_cases=values["dev"],
                                split_dev=values["split_dev"], output_dir=values["output_dir"], settings=settings,
                                case_settings=case_settings(args.query_fields, args.label_field, args.query_template))
        print(f"\nwritten to {values['output_dir']}/: classification.json, classification.md, "
              "classification_predictions.jsonl, classification_pairs.jsonl, results.json, results.csv, results.md")
        return 0
    if values["corpus"] or is_beir_folder(values["data"]):
        from hfemb.evaluation.retrieval import evaluate_retrieval

        rset, dev_set = load_retrieval_sets(values, settings)
        evaluate_retrieval(models, rset, dev_set=dev_set, split_dev=values["split_dev"], settings=settings,
                           output_dir=values["output_dir"])
        print(f"\nwritten to {values['output_dir']}/: results.json, results.csv, results.md")
        return 0
    evaluate(models, values["data"], dev_path=values["dev"], split_dev=values["split_dev"],
             output_dir=values["output_dir"], settings=settings)
    print(f"\nwritten to {values['output_dir']}/: results.json, results.csv, results.md"
          + (", f1_vs_threshold.png, pr_curves.png" if settings.plots else ""))
    return 0
