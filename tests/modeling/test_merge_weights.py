"""`hfemb merge-weights`: per-tensor fp32 interpolation against numpy, slerp's end points and angle, checkpoint
averaging, the written folder, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hfemb.cli import main
from hfemb.errors import HfembError
from hfemb.modeling.merge_weights import average_state_dicts, merge_state_dicts, slerp
from hfemb.testing.tiny import perturbed_copy


@pytest.fixture(scope="module")
def base_and_tuned(tiny_qwen3, tmp_path_factory):
    return tiny_qwen3, Path(perturbed_copy(tiny_qwen3, tmp_path_factory.mktemp("merge") / "tuned", scale=0.1, seed=0))


def test_linear_merge_equals_numpy_per_tensor(base_and_tuned, tmp_path, capsys):
    base, tuned = base_and_tuned
    out = tmp_path / "merged"
    code = main(["merge-weights", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.3", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    b, t, m = (load_file(str(Path(p) / "model.safetensors")) for p in (base, tuned, out))
    assert m.keys() == t.keys()
    for name in t:
        expected = 0.7 * b[name].double().numpy() + 0.3 * t[name].double().numpy()
        np.testing.assert_allclose(m[name].double().numpy(), expected, rtol=1e-5, atol=1e-6)
        assert m[name].dtype == t[name].dtype
    assert json.loads((out / "hfemb_merge.json").read_text())["alpha"] == 0.3
    assert (out / "tokenizer.json").exists() and (out / "modules.json").exists() == (Path(tuned) / "modules.json").exists()
    from hfemb.modeling.loading import load_embedding_model

    vec = load_embedding_model(str(out), torch_dtype="float32").encode(["a short test"], is_query=False)
    assert np.isfinite(np.asarray(vec)).all()


def test_slerp_end_points_and_angle():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)  # angle 90 degrees: both weights sin(45)/sin(90)
    torch.testing.assert_close(mid, torch.tensor([np.sqrt(0.5), 2 * np.sqrt(0.5), 0.0], dtype=torch.float32))
    torch.testing.assert_close(slerp(a, 3 * a, 0.25), 1.5 * a)  # parallel: linear
    merged = merge_state_dicts({"w": a, "i": torch.tensor([1])}, {"w": b, "i": torch.tensor([2])}, 0.5, "slerp")
    torch.testing.assert_close(merged["w"], mid)
    assert merged["i"].tolist() == [2]
    # an integer buffer only the base saved (BERT's embeddings.position_ids) is left out; a weight is not
    merged = merge_state_dicts({"w": a, "position_ids": torch.arange(3)}, {"w": b}, 0.5)
    assert set(merged) == {"w"}
    with pytest.raises(HfembError, match="only in base"):
        merge_state_dicts({"w": a, "v": a}, {"w": b}, 0.5)


def test_average_of_checkpoints():
    states = [{"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}, {"w": torch.tensor([3.0, 4.0], dtype=torch.bfloat16)},
              {"w": torch.tensor([5.0, 9.0], dtype=torch.bfloat16)}]
    avg = average_state_dicts(states)
    assert avg["w"].dtype == torch.bfloat16 and avg["w"].float().tolist() == [3.0, 5.0]


def test_errors_are_one_line(base_and_tuned, tmp_path, capsys):
    base, tuned = base_and_tuned
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for argv, message in ((["--tuned", str(adapter)], "an adapter folder"),
                          (["--tuned", str(tuned), "--method", "linear", "--output", str(tuned)], "must differ"),
                          (["--tuned", str(tmp_path / "empty")], "no model.safetensors")):
        args = ["merge-weights", "--base", str(base), "--alpha", "0.5", "--output", str(tmp_path / "o"), *argv]
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
