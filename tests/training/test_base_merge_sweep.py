"""`hfemb merge-weights --alpha A B ... --choose-on DEV`: each alpha's dev metric equals run_eval's on the folder
`hfemb merge-weights --alpha A` writes, the best is kept and recorded, the model is left at the tuned weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfemb.cli import main
from hfemb.evaluation.evaluate import evaluate
from hfemb.modeling.loading import load_embedding_model
from hfemb.modeling.merge_weights import load_state_dict
from hfemb.testing.tiny import perturbed_copy
from hfemb.training.base_merge_sweep import choose_alpha_on_dev, sweep_base_merge
from hfemb.training.config import DataConfig
from hfemb.training.evaluator import evaluator_from_file

ALPHAS = (0.3, 0.6, 1.0)


@pytest.fixture(scope="module")
def base_and_tuned(tiny_qwen3, tmp_path_factory):
    return tiny_qwen3, perturbed_copy(tiny_qwen3, tmp_path_factory.mktemp("sweep") / "tuned", scale=0.3, seed=1)


@pytest.fixture(scope="module")
def dev_pools(zh_sample_csv, tmp_path_factory) -> str:
    """12 questions, each with its answer (label 1) and the next 4 questions' answers (label 0)."""
    with open(zh_sample_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:16]
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows[:12]):
            docs = [{"content": r["answer"], "label": 1}] + [{"content": o["answer"], "label": 0} for o in rows[i + 1:i + 5]]
            f.write(json.dumps({"query": r["title"] + r["ask"], "documents": docs}, ensure_ascii=False) + "\n")
    return str(path)


def run_eval_metric(folder: str, dev: str, metric: str, out: Path) -> float:
    """The oracle: run_eval's own code on a written model folder."""
    report = evaluate({"m": folder}, dev, output_dir=str(out), n_bootstrap=0, show_progress=False, print_table=False,
                      plots=False)
    return report["models"]["m"][metric]


def test_each_alpha_scores_what_run_eval_gives_the_written_merge(base_and_tuned, dev_pools, tmp_path):
    base, tuned = base_and_tuned
    got, _ = choose_alpha_on_dev(base, tuned, dev_pools, ALPHAS, metric="roc_auc")
    expected = {}
    for alpha in ALPHAS:
        folder = tmp_path / f"a{alpha}"
        assert main(["merge-weights", "--base", base, "--tuned", tuned, "--alpha", str(alpha),
                     "--output", str(folder)]) == 0
        expected[f"{alpha:g}"] = run_eval_metric(str(folder), dev_pools, "roc_auc", tmp_path / f"ev{alpha}")
    assert got["values"].keys() == expected.keys()
    for alpha, value in expected.items():
        assert got["values"][alpha] == pytest.approx(value, abs=1e-6)
    assert len(set(round(v, 6) for v in expected.values())) > 1  # the alphas differ, so the choice means something
    assert got["chosen"] == max(ALPHAS, key=lambda a: (expected[f"{a:g}"], a))
    assert got["metric"] == "roc_auc" and got["data"].endswith("dev.jsonl")


def test_the_model_is_left_at_the_tuned_weights(base_and_tuned, dev_pools):
    base, tuned = base_and_tuned
    model = load_embedding_model(tuned, torch_dtype="float32")
    evaluator = evaluator_from_file(dev_pools, name=None, data_config=DataConfig())
    sweep_base_merge(model, load_state_dict(base), load_state_dict(tuned), [evaluator], (0.2, 0.7), "best_f1")
    saved = load_state_dict(tuned)
    params = model.backbone.state_dict()
    assert all(torch.equal(params[k], v) for k, v in saved.items())


def test_cli_keeps_the_best_alpha_and_records_the_sweep(base_and_tuned, dev_pools, tmp_path, capsys):
    base, tuned = base_and_tuned
    out = tmp_path / "chosen"
    code = main(["merge-weights", "--base", base, "--tuned", tuned, "--alpha", *map(str, ALPHAS),
                 "--choose-on", dev_pools, "--metric", "roc_auc", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "hfemb_merge.json").read_text())
    chosen = record["chosen_on"]
    assert record["alpha"] == chosen["chosen"] and chosen["metric"] == "roc_auc"
    assert set(chosen["values"]) == {f"{a:g}" for a in ALPHAS}
    # the written weights are that alpha's merge
    direct = tmp_path / "direct"
    assert main(["merge-weights", "--base", base, "--tuned", tuned, "--alpha", str(record["alpha"]),
                 "--output", str(direct)]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(direct / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = (out / "README.md").read_text()
    assert "alpha chosen on a dev set" in card and "roc_auc" in card


def test_cli_errors_are_one_line(base_and_tuned, dev_pools, tmp_path, capsys):
    base, tuned = base_and_tuned
    for extra, message in ((["--alpha", "0.3", "0.5"], "need --choose-on"),
                           (["--alpha", "0.5", "--metric", "roc_auc"], "apply to --choose-on only"),
                           (["--alpha", "0.5", "--trust-remote-code"], "apply to --choose-on only"),
                           (["--alpha", "0.3", "0.5", "--choose-on", dev_pools, "--metric", "ndcg"], "--metric 'ndcg'")):
        code = main(["merge-weights", "--base", base, "--tuned", tuned, "--output", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def _run(model, train_file, eval_file, out, base_merge_alpha=None, base_merge_alphas=None):
    from hfemb.training.config import config_from_dict
    from hfemb.training.runner import run_training

    return run_training(config_from_dict({
        "model": {"name_or_path": model, "finetune_type": "full", "torch_dtype": "float32"},
        "data": {"train_file": train_file, "eval_file": eval_file, "query_max_len": 512, "passage_max_len": 512,
                 "num_negatives": 2},
        "export": {"base_merge_alpha": base_merge_alpha, "base_merge_alphas": base_merge_alphas},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 4, "max_steps": 4,
                     "learning_rate": 1e-3, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
                     "metric_for_best_model": "eval_roc_auc", "seed": 0, "dataloader_pin_memory": False,
                     "disable_tqdm": True}}))


@pytest.fixture(scope="module")
def train_rows(zh_sample_csv, tmp_path_factory) -> str:
    with open(zh_sample_csv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[20:36]
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            negs = [rows[(i + 3) % 16]["answer"], rows[(i + 7) % 16]["answer"]]
            f.write(json.dumps({"query": r["title"] + r["ask"], "positive": r["answer"], "negative": negs},
                               ensure_ascii=False) + "\n")
    return str(path)


def test_a_run_chooses_its_alpha_on_its_eval_set(tiny_qwen3, train_rows, dev_pools, tmp_path):
    """export.base_merge_alphas [0.3, 0.7, 1]: each value equals run_eval on `hfemb merge-weights` of the same run's
    trained weights (the run at alpha 1), merged/ is the best one's interpolation, summary and card say so. (Lengths
    that truncate nothing: run_eval does not truncate like data.query_max_len.)"""
    alphas = [0.3, 0.7, 1.0]
    _run(tiny_qwen3, train_rows, dev_pools, tmp_path / "trained", 1)
    summary = _run(tiny_qwen3, train_rows, dev_pools, tmp_path / "chosen", base_merge_alphas=alphas)
    chosen_on = summary["base_merge"]["chosen_on"]
    expected = {}
    for alpha in alphas:
        folder = tmp_path / f"a{alpha}"
        assert main(["merge-weights", "--base", tiny_qwen3, "--tuned", str(tmp_path / "trained" / "merged"),
                     "--alpha", str(alpha), "--output", str(folder)]) == 0
        expected[f"{alpha:g}"] = run_eval_metric(str(folder), dev_pools, "roc_auc", tmp_path / f"ev{alpha}")
    assert chosen_on["metric"] == "roc_auc" and chosen_on["values"].keys() == expected.keys()
    for alpha, value in expected.items():
        assert chosen_on["values"][alpha] == pytest.approx(value, abs=1e-6)
    assert len({round(v, 6) for v in expected.values()}) > 1  # not a tie that alpha 1 wins by default
    best = max(alphas, key=lambda a: (expected[f"{a:g}"], a))
    assert chosen_on["chosen"] == best and summary["base_merge"]["alpha"] == best
    from hfemb.training.config import config_from_dict

    assert config_from_dict(summary["config"]).export.base_merge_alphas == alphas  # the record is a usable config
    if best < 1:
        record = json.loads((tmp_path / "chosen" / "merged" / "hfemb_merge.json").read_text())
        assert record["by"] == "export.base_merge_alphas" and record["chosen_on"]["chosen"] == best
    got = load_file(str(tmp_path / "chosen" / "merged" / "model.safetensors"))
    want = load_file(str((tmp_path / f"a{best}" if best < 1 else tmp_path / "trained" / "merged") / "model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-6, atol=1e-7)
    card = (tmp_path / "chosen" / "merged" / "README.md").read_text()
    assert ("alpha chosen on a dev set" if best < 1 else "alpha 1 scored highest") in card


def test_a_list_of_alphas_needs_an_eval_set_and_valid_values(tiny_qwen3, train_rows, tmp_path):
    from hfemb.errors import ConfigError
    from hfemb.training.config import config_from_dict

    base = {"model": {"name_or_path": "m"}, "data": {"train_file": "t.jsonl"}, "training": {"output_dir": "o"}}
    assert config_from_dict({**base, "export": {"base_merge_alphas": [0.3, 1]}}).export.base_merge_alphas == [0.3, 1.0]
    for export, message in (({"base_merge_alphas": [0.3, 1.5]}, "non-empty list of numbers in \\(0, 1\\]"),
                            ({"base_merge_alphas": []}, "non-empty list"),
                            ({"base_merge_alphas": ["a"]}, "must be a list of numbers"),
                            ({"base_merge_alphas": [0.3], "base_merge_alpha": 0.5}, "not both")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({**base, "export": export})
    with pytest.raises(ConfigError, match="the run has none: set data.eval_file"):
        _run(tiny_qwen3, train_rows, None, tmp_path / "no-eval", base_merge_alphas=[0.3, 1.0])
    assert not (tmp_path / "no-eval" / "merged").exists()


def test_a_failed_choice_keeps_the_trained_weights_and_says_how_to_retry(tiny_qwen3, train_rows, dev_pools, tmp_path,
                                                                         monkeypatch):
    import hfemb.training.base_merge as base_merge
    from hfemb.errors import HfembError

    def unreachable(name, **kwargs):
        raise OSError(f"{name}: offline and not cached")

    monkeypatch.setattr(base_merge, "load_embedding_model", unreachable)
    with pytest.raises(HfembError, match="holds the trained weights.*--alpha 0.3 1 --choose-on EVAL_FILE"):
        _run(tiny_qwen3, train_rows, dev_pools, tmp_path / "failed", base_merge_alphas=[0.3, 1.0])
    summary = json.loads((tmp_path / "failed" / "train_summary.json").read_text())
    assert summary["base_merge"]["alpha"] == [0.3, 1.0] and "offline" in summary["base_merge"]["error"]
    card = (tmp_path / "failed" / "merged" / "README.md").read_text()
    assert "(alphas 0.3, 1.0, `export.base_merge_alphas`) was configured but failed" in card


class _Scripted:
    """An evaluator returning the next of ``values`` at each call (not looking at the model)."""
    def __init__(self, values):
        self.values = list(values)

    def __call__(self, model, sharded=True):
        return {"best_f1": self.values.pop(0)}


def test_a_non_finite_score_never_wins_and_ties_go_to_the_larger_alpha(base_and_tuned):
    base, tuned = base_and_tuned
    model = load_embedding_model(tuned, torch_dtype="float32")
    b, t = load_state_dict(base), load_state_dict(tuned)
    got = sweep_base_merge(model, b, t, [_Scripted([float("nan"), 0.5, 0.5])], (0.3, 0.6, 0.9), "best_f1")
    assert got["chosen"] == 0.9
    with pytest.raises(Exception, match="not a finite number at any alpha"):
        sweep_base_merge(model, b, t, [_Scripted([float("nan")])], (0.3,), "eval_best_f1")


def test_folders_saved_with_a_head_prefix_score_as_the_plain_ones(base_and_tuned, dev_pools, tmp_path):
    """Both folders' tensors named ``model.<name>`` (a checkpoint saved with a task head): transformers loads the
    backbone without the prefix, and the sweep maps each saved name onto it; the scores equal the plain folders'."""
    base, tuned = base_and_tuned
    prefixed = {}
    for label, folder in (("base", base), ("tuned", tuned)):
        dst = tmp_path / label
        shutil.copytree(folder, dst)
        state = load_file(str(dst / "model.safetensors"))
        save_file({f"model.{k}": v for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
        prefixed[label] = str(dst)
    plain, _ = choose_alpha_on_dev(base, tuned, dev_pools, (0.4, 1.0), metric="roc_auc")
    got, _ = choose_alpha_on_dev(prefixed["base"], prefixed["tuned"], dev_pools, (0.4, 1.0), metric="roc_auc")
    assert got["values"] == pytest.approx(plain["values"], abs=1e-6) and got["chosen"] == plain["chosen"]
