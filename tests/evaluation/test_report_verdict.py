"""The evaluation's verdict (issue 13, item 3): the model to deploy is chosen on dev, where its threshold was
chosen, not by its eval (test) F1; without a dev set the choice says it is optimistic."""

from __future__ import annotations

from hfemb.evaluation.report import deploy_choice, verdict


def _model(dev_f1, eval_f1, threshold):
    return {"chosen_threshold": threshold, "chosen_on": "dev" if dev_f1 is not None else "eval",
            "f1_at_chosen": eval_f1, "dev": {"best_f1": dev_f1} if dev_f1 is not None else None}


def test_deploy_is_chosen_on_dev_not_on_the_test_f1():
    # "lucky" wins on the eval set, "steady" on dev: the verdict must name "steady"
    models = {"base": _model(0.60, 0.61, 0.5), "lucky": _model(0.70, 0.80, 0.55), "steady": _model(0.75, 0.72, 0.6)}
    report = {"models": models, "reference_model": "base"}
    assert deploy_choice(models) == ("steady", "dev")
    text = verdict(report)
    assert text.startswith("**Deploy steady at threshold 0.600**") and "F1 on the dev set (0.7500)" in text
    assert "eval F1 0.7200" in text


def test_without_dev_the_choice_is_on_eval_and_called_optimistic():
    models = {"base": _model(None, 0.61, 0.5), "tuned": _model(None, 0.8, 0.55)}
    assert deploy_choice(models) == ("tuned", "eval")
    assert "optimistic" in verdict({"models": models, "reference_model": "base"})
