"""`hfemb push`: the staged folder (exactly what is uploaded), the dry run, the HfApi calls (a recording
stand-in: no network here), one clear message per failure, no token anywhere, nothing local changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from hfemb.cli import main
from hfemb.errors import ConfigError, HfembError
from hfemb.publishing.hub import PushSettings, push, push_settings, stage_upload

SECRET = "hf_TESTsecretTOKENvalue0123456789"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_qwen3, zh_sample_csv):
    """A real training output: adapter/, merged/, a checkpoint with optimizer state, logs, summary."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from test_trainer import make_config

    from hfemb.data.formats import read_records
    from hfemb.training.runner import run_training

    root = tmp_path_factory.mktemp("hub")
    recs = read_records(str(zh_sample_csv)).records[:16]
    with open(root / "train.jsonl", "w", encoding="utf-8") as fh:
        for i, r in enumerate(recs):
            fh.write(json.dumps({"query": r.query, "positive": r.positives[0],
                                 "negative": [recs[(i + 3) % 16].positives[0], recs[(i + 7) % 16].positives[0]]},
                                ensure_ascii=False) + "\n")
    out = root / "run"
    run_training(make_config(tiny_qwen3, str(root / "train.jsonl"), out,
                             training={"max_steps": 2, "save_strategy": "steps", "save_steps": 2}))
    (out / "training_curves.png").write_bytes(b"\x89PNG curves")
    assert (out / "checkpoint-2" / "optimizer.pt").exists() and (out / "checkpoint-2" / "training_args.bin").exists()
    return out


@pytest.fixture
def output(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def tree_state(root: Path) -> dict:
    """Every file under ``root`` with its content hash and mtime, and every folder."""
    state = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        state[rel] = (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else "dir"
    return state


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder held."""

    calls: list = []
    fail_on: str | None = None
    error: Exception | None = None

    def __init__(self, token=None, **kwargs):
        RecordingApi.calls.append(("init", {"token": token, **kwargs}))

    def _maybe_fail(self, name):
        if RecordingApi.fail_on == name:
            raise RecordingApi.error

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail("create_repo")

    def create_branch(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        RecordingApi.calls.append(("upload_folder", {**kwargs, "files": files}))
        self._maybe_fail("upload_folder")
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc",
                                          commit_message="m", commit_description="", oid="abc")


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    """Online mode, a token in HF_TOKEN, HfApi replaced by the recorder, an empty login cache."""
    import huggingface_hub.constants as constants

    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    RecordingApi.calls, RecordingApi.fail_on, RecordingApi.error = [], None, None
    return RecordingApi


def merged_files(out: Path) -> set[str]:
    return {p.relative_to(out / "merged").as_posix() for p in (out / "merged").rglob("*") if p.is_file()}


# ---- staging ---------------------------------------------------------------------------------------
def test_staged_training_output_is_merged_model_plus_card(output, tmp_path):
    staged = tmp_path / "staged"
    files = stage_upload(output, staged, repo_id="alice/tiny-emb")
    names = {f.path for f in files}
    assert names == (merged_files(output) - {"README.md"}) | {"README.md", "train_summary.json", "training_curves.png"}
    assert not any(n.startswith(("checkpoint-", "adapter")) or n.endswith((".pt", ".bin", ".pth")) for n in names)
    assert {f.path: f.size for f in files}["model.safetensors"] == (output / "merged" / "model.safetensors").stat().st_size
    for name in ("model.safetensors", "tokenizer.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (staged / name).read_bytes() == (output / "merged" / name).read_bytes()
    card = ModelCard.load(staged / "README.md")
    assert card.data.library_name == "sentence-transformers" and "lora" in card.data.tags
    assert "SentenceTransformer('alice/tiny-emb')" in card.text and "# tiny-emb" in card.text
    assert str(output) not in card.text  # the Hub card names the repo, not local folders
    assert (staged / "training_curves.png").read_bytes() == b"\x89PNG curves"
    summary = json.loads((staged / "train_summary.json").read_text())
    assert summary["global_step"] == json.loads((output / "train_summary.json").read_text())["global_step"]


def test_staged_adapter_only(output, tmp_path):
    files = {f.path for f in stage_upload(output, tmp_path / "s", adapter_only=True, repo_id="alice/tiny-lora")}
    adapter = {p.relative_to(output / "adapter").as_posix() for p in (output / "adapter").rglob("*") if p.is_file()}
    assert files == adapter | {"train_summary.json", "training_curves.png"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    text = (tmp_path / "s" / "README.md").read_text()
    assert "More Information Needed" not in text and "LoRA adapter" in text


def test_model_folder_sources(output, tmp_path):
    # the merged folder itself: its training output is found through the parent
    a = {f.path for f in stage_upload(output / "merged", tmp_path / "a", repo_id="alice/x")}
    assert "train_summary.json" in a and "training_curves.png" in a
    # a plain model folder without a training summary keeps its own README.md
    plain = tmp_path / "plain"
    shutil.copytree(output / "merged", plain)
    (plain / "README.md").write_text("my own card\n")
    b = {f.path for f in stage_upload(plain, tmp_path / "b", repo_id="alice/x")}
    assert b == {p.relative_to(plain).as_posix() for p in plain.rglob("*") if p.is_file()}
    assert (tmp_path / "b" / "README.md").read_text() == "my own card\n"
    with pytest.raises(HfembError, match="--adapter-only"):
        stage_upload(output / "adapter", tmp_path / "c")
    with pytest.raises(HfembError, match="no adapter_config.json"):
        stage_upload(plain, tmp_path / "d", adapter_only=True)
    shutil.rmtree(output / "adapter")
    with pytest.raises(HfembError, match="no adapter/ folder"):
        stage_upload(output, tmp_path / "e", adapter_only=True)
    with pytest.raises(HfembError, match="neither a training output"):
        stage_upload(tmp_path / "b" / "1_Pooling", tmp_path / "f")


# ---- dry run and push ------------------------------------------------------------------------------
def test_dry_run_prints_the_upload_and_touches_nothing(output, hub, capsys):
    before = tree_state(output.parent)
    assert main(["push", str(output), "--repo-id", "alice/tiny-emb", "--private", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert hub.calls == []  # HfApi never even constructed
    assert tree_state(output.parent) == before  # staging folder removed, sources untouched
    lines = printed.splitlines()
    assert "https://huggingface.co/alice/tiny-emb" in lines[0] and "private" in lines[0]
    listed = {line.split()[0] for line in lines[1:] if line.startswith("  ")}
    assert listed == (merged_files(output) - {"README.md"}) | {"README.md", "train_summary.json",
                                                               "training_curves.png"}
    size_line = next(line for line in lines if line.strip().startswith("model.safetensors"))
    mb = (output / "merged" / "model.safetensors").stat().st_size / 1024 ** 2
    assert size_line.split()[-2:] == [f"{mb:.1f}", "MB"]
    assert f"would upload {len(listed)} files" in lines[0]
    assert "token: found (HF_TOKEN)" in printed and "Nothing was uploaded" in printed
    assert SECRET not in printed


def test_push_calls(output, hub, capsys):
    before = tree_state(output.parent)
    assert main(["push", str(output), "--repo-id", "alice/tiny-emb", "--private", "--revision", "v1",
                 "--commit-message", "first model"]) == 0
    printed = capsys.readouterr().out
    names = [c[0] for c in hub.calls]
    assert names == ["init", "create_repo", "create_branch", "upload_folder"]
    calls = dict(hub.calls)
    assert calls["init"]["token"] == SECRET  # the token goes to huggingface_hub only
    assert calls["create_repo"] == {"repo_id": "alice/tiny-emb", "private": True, "exist_ok": True,
                                    "repo_type": "model"}
    assert calls["create_branch"] == {"repo_id": "alice/tiny-emb", "branch": "v1", "exist_ok": True,
                                      "repo_type": "model"}
    up = calls["upload_folder"]
    assert (up["repo_id"], up["revision"], up["commit_message"], up["repo_type"]) == ("alice/tiny-emb", "v1",
                                                                                      "first model", "model")
    assert set(up["files"]) == (merged_files(output) - {"README.md"}) | {"README.md", "train_summary.json",
                                                                         "training_curves.png"}
    assert up["files"]["model.safetensors"] == (output / "merged" / "model.safetensors").read_bytes()
    assert b"SentenceTransformer('alice/tiny-emb')" in up["files"]["README.md"]
    assert all(SECRET.encode() not in content for content in up["files"].values())
    assert "pushed: https://huggingface.co/alice/tiny-emb/commit/abc" in printed and SECRET not in printed
    assert not Path(up["folder_path"]).exists()  # staging removed
    assert tree_state(output.parent) == before


def test_push_default_visibility_and_main(output, hub):
    assert main(["push", str(output / "merged"), "--repo-id", "alice/x"]) == 0
    calls = dict(hub.calls)
    assert calls["create_repo"]["private"] is None and "create_branch" not in calls
    assert calls["upload_folder"]["revision"] is None
    assert calls["upload_folder"]["commit_message"] == "Upload embedding model fine-tuned with hfemb"


def _http_error(cls, status: int, message: str = "") -> Exception:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    response = httpx2.Response(status, request=request, headers={"X-Error-Message": message} if message else {})
    return cls(f"{status} error (token {SECRET})", response=response, server_message=message or None)


@pytest.mark.parametrize("fail_on, error, expected", [
    ("create_repo", lambda: _http_error(HfHubHTTPError, 401, "Invalid credentials"), "rejected the token (401"),
    ("create_repo", lambda: _http_error(HfHubHTTPError, 403, "You don't have the rights"), "no write permission for "
                                                                                           "bob/model (403"),
    ("upload_folder", lambda: _http_error(HfHubHTTPError, 403), "no write permission for bob/model"),
    ("upload_folder", lambda: _http_error(RepositoryNotFoundError, 404), "repository bob/model not found"),
    ("upload_folder", lambda: _http_error(HfHubHTTPError, 500, "boom"), "refused the upload to bob/model (HTTP 500) "
                                                                        "(Hub: boom)"),
    ("create_repo", lambda: httpx2.ConnectError("[Errno -2] Name or service not known"), "cannot reach the Hub"),
    ("upload_folder", lambda: TimeoutError("timed out"), "cannot reach the Hub"),
])
def test_push_failures_give_one_clear_message(output, hub, capsys, fail_on, error, expected):
    hub.fail_on, hub.error = fail_on, error()
    before = tree_state(output.parent)
    assert main(["push", str(output), "--repo-id", "bob/model"]) == 2
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("hfemb push: error: ") and expected in err_lines[0]
    assert SECRET not in captured.err + captured.out
    assert tree_state(output.parent) == before


def test_no_token_and_offline(output, hub, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    before = tree_state(output.parent)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert main(["push", str(output), "--repo-id", "alice/x"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token found" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert main(["push", str(output), "--repo-id", "alice/x", "--dry-run"]) == 0  # a dry run needs no token
    assert "token: NOT found" in capsys.readouterr().out
    # the login cache is used when HF_TOKEN is unset (and never printed)
    Path(constants.HF_TOKEN_PATH).write_text(SECRET)
    assert main(["push", str(output), "--repo-id", "alice/x"]) == 0
    assert dict(hub.calls)["init"]["token"] == SECRET and SECRET not in capsys.readouterr().out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.calls.clear()
    assert main(["push", str(output), "--repo-id", "alice/x"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Hub: HF_HUB_OFFLINE=1" in err and hub.calls == []
    assert tree_state(output.parent) == before


def test_bad_repo_id(output, hub, capsys):
    for bad in ("no-namespace", "a/b/c", "alice/bad name"):
        assert main(["push", str(output), "--repo-id", bad, "--dry-run"]) == 2
        assert "repo id" in capsys.readouterr().err
    assert hub.calls == []


# ---- training config -----------------------------------------------------------------------------
def test_push_settings_from_training_section():
    assert push_settings({"push_to_hub": False, "hub_model_id": "alice/x"}) is None
    s = push_settings({"push_to_hub": True, "hub_model_id": "alice/x", "hub_private_repo": True,
                       "hub_revision": "dev"})
    assert s == PushSettings("alice/x", private=True, revision="dev")
    with pytest.raises(ConfigError, match="HF_TOKEN.*hf auth login"):
        push_settings({"hub_token": "hf_abc"})
    with pytest.raises(ConfigError, match="needs training.hub_model_id"):
        push_settings({"push_to_hub": True})


def test_push_function_returns_what_it_uploaded(output, hub):
    result = push(output, PushSettings("alice/x"), echo=lambda line: None)
    up = dict(hub.calls)["upload_folder"]
    assert result["files"] == sorted(up["files"]) and result["bytes"] == sum(map(len, up["files"].values()))
    assert result["url"] == "https://huggingface.co/alice/x/commit/abc"
    assert not any(n.startswith(".hfemb-push-") for n in os.listdir(output))


# ---- issue 17 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["bad name", "a..b", "-x", "x/", "x.lock", "feat/.hidden", "a:b", "x@{1}", "a//b",
                                 "", "end.", "tab\there", "a~1", "a^", "a?", "a*", "a[b", "a\\b"])
def test_dry_run_validates_the_revision_like_the_hub(output, hub, capsys, bad):
    """Oracle: git's own branch-name check (`git check-ref-format --branch`), which the Hub applies."""
    import subprocess

    git = subprocess.run(["git", "check-ref-format", f"refs/heads/{bad}"], capture_output=True)
    assert git.returncode != 0 or bad.startswith("-")  # git refuses it too (a leading '-' only as a branch)
    assert main(["push", str(output), "--repo-id", "alice/x", f"--revision={bad}", "--dry-run"]) == 2
    assert "not a valid branch name" in capsys.readouterr().err
    assert hub.calls == []


def test_valid_revisions_pass(output, hub, capsys):
    import subprocess

    from hfemb.publishing.hub import check_revision

    for good in ("dev", "feature/v2", "v1.0", "refs/pr/3", "exp_2024-01", "@", "日本"):
        assert check_revision(good) == good
        if not good.startswith("refs/"):
            assert subprocess.run(["git", "check-ref-format", f"refs/heads/{good}"]).returncode == 0
    assert main(["push", str(output), "--repo-id", "alice/x", "--revision", "feature/v2", "--dry-run"]) == 0
    assert "revision feature/v2" in capsys.readouterr().out


def test_uploaded_summary_names_no_local_folder(output, tmp_path):
    local = json.loads((output / "train_summary.json").read_text())
    local["resumed_from"] = str(output / "checkpoint-2")
    local["config_file"] = "/home/someone/configs/lora.json"
    (output / "train_summary.json").write_text(json.dumps(local))
    stage_upload(output, tmp_path / "staged", repo_id="alice/tiny-emb")
    staged = json.loads((tmp_path / "staged" / "train_summary.json").read_text())

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(staged) if s.startswith("/") or str(tmp_path) in s]
    assert staged["resumed_from"] == "checkpoint-2" and staged["config_file"] == "lora.json"
    assert staged["outputs"]["merged"] == "merged"
    assert staged["global_step"] == local["global_step"]
