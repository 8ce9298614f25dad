"""``hfemb eval --prompt-name NAME`` (issue 16, item 5): queries get the prompt a model saved under NAME (one
dataset's instruction of ``data.train_files``): the same vectors and metrics as passing that task with
``--instruction`` (the independent path), and a clear error for a model without it."""

from __future__ import annotations

import json

import pytest

from hfemb.cli import main
from hfemb.modeling.loading import format_instruction, load_embedding_model

TASK = "Given a question about a capital city, retrieve the passage"


@pytest.fixture(scope="module")
def model_with_named_prompt(tiny_qwen3, tmp_path_factory) -> str:
    model = load_embedding_model(tiny_qwen3)
    model.named_prompts["capitals"] = format_instruction(TASK, "")
    folder = tmp_path_factory.mktemp("named") / "model"
    model.save_pretrained(folder)
    return str(folder)


def _eval(tmp_path, model: str, name: str, *extra: str) -> int:
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"query": "capital of France", "positive": ["Paris is the capital of France."]},
        {"query": "capital of Italy", "positive": ["Rome is the capital of Italy."]},
        {"query": "which pet plays fetch", "positive": ["Dogs love to play fetch."]}]) + "\n", encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Green tea is healthy.\nBerlin is in Germany.\nThe Nile is long.\n", encoding="utf-8")
    return main(["eval", "--data", str(data), "--corpus", str(corpus), "--model", f"m={model}",
                 "--output-dir", str(tmp_path / name), "--no-cache", "--quiet", "--bootstrap", "0", *extra])


def test_prompt_name_equals_the_same_instruction(model_with_named_prompt, tmp_path):
    assert _eval(tmp_path, model_with_named_prompt, "named", "--prompt-name", "capitals") == 0
    assert _eval(tmp_path, model_with_named_prompt, "task", "--instruction", TASK) == 0
    assert _eval(tmp_path, model_with_named_prompt, "default") == 0
    named, task, default = (json.loads((tmp_path / n / "results.json").read_text())["models"]["m"]
                            for n in ("named", "task", "default"))
    assert named["query_prompt"] == format_instruction(TASK, "") == task["query_prompt"] != default["query_prompt"]
    assert named["retrieval"] == task["retrieval"]
    assert json.loads((tmp_path / "named" / "results.json").read_text())["settings"]["prompt_name"] == "capitals"


def test_unknown_prompt_name_is_one_clear_error(model_with_named_prompt, tmp_path, capsys):
    assert _eval(tmp_path, model_with_named_prompt, "bad", "--prompt-name", "law") == 2
    err = capsys.readouterr()
    message = err.err + err.out
    assert "no prompt named 'law'" in message and "query, document, capitals" in message
    with pytest.raises(SystemExit):  # argparse: --instruction not allowed with --prompt-name
        _eval(tmp_path, model_with_named_prompt, "both", "--prompt-name", "capitals", "--instruction", "x")


def test_settings_refuse_prompt_name_with_instruction():
    from hfemb.errors import ConfigError
    from hfemb.evaluation.settings import EvalSettings

    with pytest.raises(ConfigError, match="give prompt_name .* or instruction"):
        EvalSettings(prompt_name="capitals", instruction=False)
    assert EvalSettings(prompt_name="capitals").prompt_name == "capitals"
