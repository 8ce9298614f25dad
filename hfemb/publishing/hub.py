"""Push a trained model to the Hugging Face Hub: stage exactly what is uploaded, then
``HfApi.create_repo(exist_ok=True)`` and ``HfApi.upload_folder``.

The token comes from huggingface_hub (``HF_TOKEN``, else the ``hf auth login`` cache) and is never printed,
logged or written anywhere. Staging happens in a temporary folder (hard links where the filesystem allows,
else copies) that is removed afterwards; the source folders are never modified, whether the push succeeds
or fails. Staged: the model folder's files without checkpoints, optimizer/scheduler/RNG states,
``trainer_state.json`` and ``training_args.bin`` (a pickle of TrainingArguments, which can hold a token);
a regenerated ``README.md`` model card (+ ``hfemb_threshold.json``, ``training_curves.png``) and, for a
training output, its ``train_summary.json``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import write_json
from hfemb.publishing.card_inputs import is_hub_id
from hfemb.publishing.card_sections import clean_config
from hfemb.publishing.model_card import write_model_card

log = logging.getLogger("hfemb.publishing.hub")

# TrainingArguments' Hub fields: hfemb pushes once, itself, after training; the HF Trainer never pushes.
PUSH_KEYS = ("push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_always_push", "hub_revision",
             "hub_token")
NEVER_UPLOADED = ("checkpoint-*", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json",
                  "training_args.bin", "runs", ".*", "__pycache__", "*.tmp", "*.lock")
REGENERATED = ("README.md", "hfemb_threshold.json", "training_curves.png")
LOGIN_HELP = "set HF_TOKEN to a write token or run `hf auth login`"


@dataclass
class PushSettings:
    repo_id: str
    private: bool | None = None  # None: the Hub's default for new repos; an existing repo keeps its visibility
    revision: str | None = None  # branch (created if missing); None: main
    commit_message: str | None = None


@dataclass
class StagedFile:
    path: str  # relative, with "/"
    size: int


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"repo id {repo_id!r}: {exc}") from None
    if repo_id.count("/") != 1:
        raise ConfigError(f"repo id {repo_id!r}: expected USER/NAME (or ORG/NAME)")
    return repo_id


_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_revision(revision: str | None, option: str = "--revision") -> str | None:
    """``revision`` (a branch to push to) checked as the Hub checks it, which follows git's branch-name rules
    (``git check-ref-format --branch``): no spaces, control characters or any of ``~^:?*[\\``, no ``..``,
    ``@{`` or ``//``, no part starting with ``.`` or ending in ``.lock``, not starting with ``-`` or ``/``,
    not ending with ``/`` or ``.``; ``refs/pr/N`` (a pull request) is accepted.
    Raises `ConfigError` naming the rule broken."""
    if revision is None or re.fullmatch(r"refs/pr/\d+", revision):
        return revision
    problem = None
    if not revision:
        problem = "is empty"
    elif _BAD_REF_CHARS.search(revision):
        problem = "contains a space, a control character or one of ~ ^ : ? * [ \\"
    elif ".." in revision or "@{" in revision or "//" in revision:
        problem = "contains '..', '@{' or '//'"
    elif revision.startswith(("-", "/")) or revision.endswith(("/", ".")):
        problem = "starts with '-' or '/', or ends with '/' or '.'"
    elif any(p.startswith(".") or p.endswith(".lock") for p in revision.split("/")):
        problem = "has a part starting with '.' or ending in '.lock'"
    elif len(revision.encode()) > 255:
        problem = "is longer than 255 bytes"
    if problem:
        raise ConfigError(f"{option} {revision!r}: not a valid branch name: it {problem} (git branch-name rules, "
                          "as the Hub applies them)")
    return revision


def push_settings(training: dict) -> PushSettings | None:
    """hfemb's push after training, from the ``training`` section's Hub fields (None: no push).
    ``hub_token`` is refused (tokens never go in files); ``push_to_hub`` needs ``hub_model_id``."""
    if training.get("hub_token"):
        raise ConfigError("training.hub_token: tokens never go in config files; remove it and set HF_TOKEN or run "
                          "`hf auth login` (the push reads the token from there)")
    if not training.get("push_to_hub"):
        return None
    repo_id = training.get("hub_model_id")
    if not repo_id:
        raise ConfigError("training.push_to_hub needs training.hub_model_id (USER/NAME)")
    for key in ("hub_strategy", "hub_always_push"):
        if key in training:
            log.warning("training.%s is ignored: hfemb pushes the final model once, after training", key)
    return PushSettings(check_repo_id(repo_id), private=training.get("hub_private_repo"),
                        revision=check_revision(training.get("hub_revision"), "training.hub_revision"))


def token_source() -> str | None:
    """Where the token would come from ("HF_TOKEN" / "the login cache"), or None; never the token itself."""
    from huggingface_hub import get_token

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            return name
    return "the login cache" if get_token() else None


def check_can_push() -> None:
    """Fail early (before training) when a push cannot work: offline mode or no token."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HfembError("cannot reach the Hub: HF_HUB_OFFLINE=1 is set; unset it to push (or push later with "
                         "`hfemb push OUTPUT_DIR --repo-id USER/NAME`)")
    if token_source() is None:
        raise HfembError(f"no Hugging Face token found: {LOGIN_HELP}")


# ---- staging -------------------------------------------------------------------------------------
def resolve_push_source(source: str | os.PathLike, adapter_only: bool = False) -> tuple[Path, Path | None]:
    """(model folder to upload, training output folder or None). ``source`` is a training output folder
    (``merged/``, or ``adapter/`` with ``adapter_only``) or a model/adapter folder itself."""
    source = Path(source)
    if not source.is_dir():
        raise HfembError(f"{source}: no such folder")
    if (source / "merged").is_dir() or (source / "adapter").is_dir():
        sub = source / ("adapter" if adapter_only else "merged")
        if not sub.is_dir():
            raise HfembError(f"{source}: no {sub.name}/ folder to push"
                             + (" (full fine-tuning has no adapter)" if adapter_only else
                                " (merge the adapter first: `hfemb merge` or push with --adapter-only)"))
        return sub, source
    is_adapter = (source / "adapter_config.json").is_file()
    has_weights = any(source.glob("model*.safetensors*")) or any(source.glob("pytorch_model*.bin*"))
    if not is_adapter and not ((source / "config.json").is_file() and has_weights):
        raise HfembError(f"{source}: neither a training output (merged/, adapter/) nor a model folder "
                         "(config.json + weights) nor a LoRA adapter folder (adapter_config.json)")
    if adapter_only and not is_adapter:
        raise HfembError(f"{source}: --adapter-only, but this folder has no adapter_config.json")
    if not adapter_only and is_adapter:
        raise HfembError(f"{source} is a LoRA adapter folder: pass --adapter-only to push it as an adapter, or merge "
                         "it first with `hfemb merge`")
    parent = source.parent
    return source, parent if (parent / "train_summary.json").is_file() else None


def _excluded(rel: str) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in rel.split("/") for pattern in NEVER_UPLOADED)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same inode: the staged copy is never written to, only read by the upload
    except OSError:
        shutil.copy2(src, dst)


def public_paths(obj, output_dir: str | os.PathLike):
    """``obj`` (a JSON value) with every absolute local path made relative to ``output_dir`` when inside it
    (``/home/me/runs/r1/checkpoint-4`` -> ``checkpoint-4``), else cut to its file name: what is uploaded
    names no local folder."""
    root = os.path.realpath(output_dir)

    def fix(value):
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
            real = os.path.realpath(value)
            inside = real == root or real.startswith(root + os.sep)
            return os.path.relpath(real, root) if inside else os.path.basename(value.rstrip("/\\")) or value
        return value

    return fix(obj)


def stage_upload(source: str | os.PathLike, staging_dir: str | os.PathLike, *, adapter_only: bool = False,
                 repo_id: str | None = None, eval_results=None, eval_model_name: str | None = None) -> list[StagedFile]:
    """Fill the empty ``staging_dir`` with exactly what will be uploaded; returns the files, sorted."""
    model_dir, output_dir = resolve_push_source(source, adapter_only)
    staging = Path(staging_dir)
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir).as_posix()
        if path.is_file() and not _excluded(rel):
            _link_or_copy(path, staging / rel)
    if not adapter_only and any((staging / n).exists() for n in ("adapter_config.json", "adapter_model.safetensors")):
        raise HfembError(f"{model_dir} holds adapter files next to full weights; loaders would re-attach the adapter. "
                         "Re-merge it with `hfemb merge`.")
    if output_dir is None and (model_dir / "README.md").is_file() and eval_results is None:
        pass  # no training summary to rebuild the card from: keep the folder's own README.md
    else:
        for name in REGENERATED:  # unlinks the staged hard link only
            (staging / name).unlink(missing_ok=True)
        if output_dir is not None:
            summary = json.loads((output_dir / "train_summary.json").read_text(encoding="utf-8"))
            summary["config"] = clean_config(summary.get("config") or {})
            write_json(staging / "train_summary.json", public_paths(summary, output_dir))
        write_model_card(model_dir, target_dir=staging, output_dir=output_dir, repo_id=repo_id,
                         eval_results=eval_results if output_dir is not None else (eval_results or False),
                         eval_model_name=eval_model_name)
    return [StagedFile(p.relative_to(staging).as_posix(), p.stat().st_size)
            for p in sorted(staging.rglob("*")) if p.is_file()]


# ---- upload --------------------------------------------------------------------------------------
def _hub_error(exc: Exception, repo_id: str, token: str | None) -> HfembError:
    """One clear message per failure kind; the token is scrubbed from anything the server echoed."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    def scrub(text: str) -> str:
        return text.replace(token, "***") if token else text

    if isinstance(exc, OfflineModeIsEnabled):
        return HfembError("cannot reach the Hub: HF_HUB_OFFLINE=1 is set; unset it to push")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        server = scrub(str(exc.server_message or "").strip().splitlines()[0][:200]) if exc.server_message else ""
        detail = f" (Hub: {server})" if server else ""
        if status == 401:
            return HfembError(f"the Hub rejected the token (401 unauthorized){detail}: {LOGIN_HELP}")
        if status == 403:
            return HfembError(f"no write permission for {repo_id} (403 forbidden){detail}: the repo belongs to "
                              "another user or organisation, or the token is read-only; use a write token with "
                              "access to it, or a repo id under your own name")
        if isinstance(exc, RepositoryNotFoundError) or status == 404:
            return HfembError(f"repository {repo_id} not found or not accessible with this token (404){detail}")
        return HfembError(f"the Hub refused the upload to {repo_id} (HTTP {status}){detail}")
    return HfembError(f"cannot reach the Hub (huggingface.co): {scrub(str(exc))[:200]}; check the network "
                      "connection and retry")


def upload_staged(staging_dir: str | os.PathLike, settings: PushSettings) -> str:
    """Create the repo if needed and upload ``staging_dir`` as one commit; returns the commit URL."""
    import huggingface_hub
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    try:
        from httpx2 import HTTPError as TransportError  # huggingface_hub 2.x
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        from httpx import HTTPError as TransportError

    check_can_push()
    token = get_token()
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(settings.repo_id, private=settings.private, exist_ok=True, repo_type="model")
        if settings.revision and settings.revision != "main":
            api.create_branch(settings.repo_id, branch=settings.revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=settings.repo_id, folder_path=str(staging_dir), repo_type="model",
                                 revision=settings.revision, commit_message=settings.commit_message
                                 or "Upload embedding model fine-tuned with hfemb")
    except (HfHubHTTPError, TransportError, ConnectionError, TimeoutError) as exc:
        raise _hub_error(exc, settings.repo_id, token) from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{settings.repo_id}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def push(source: str | os.PathLike, settings: PushSettings, *, adapter_only: bool = False, dry_run: bool = False,
         eval_results=None, eval_model_name: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Stage ``source`` (see `resolve_push_source`) and upload it, or with ``dry_run`` only print the file
    list, sizes and target. Returns {"repo_id", "files", "bytes", "url" (None on a dry run)}."""
    check_repo_id(settings.repo_id)
    check_revision(settings.revision)  # also on a dry run: it must show what the real push would refuse
    if not dry_run:
        check_can_push()  # before staging: a missing token costs nothing
    model_dir, _ = resolve_push_source(source, adapter_only)
    parent = model_dir.parent if os.access(model_dir.parent, os.W_OK) else None  # same filesystem: hard links
    staging = Path(tempfile.mkdtemp(prefix=".hfemb-push-", dir=parent))
    try:
        files = stage_upload(source, staging, adapter_only=adapter_only, repo_id=settings.repo_id,
                             eval_results=eval_results, eval_model_name=eval_model_name)
        total = sum(f.size for f in files)
        visibility = {True: "private", False: "public", None: "Hub default visibility if new"}[settings.private]
        echo(f"{'dry run: would upload' if dry_run else 'uploading'} {len(files)} files ({_size(total)}) from "
             f"{model_dir} to https://huggingface.co/{settings.repo_id} (model repo, {visibility}, "
             f"revision {settings.revision or 'main'})")
        width = max(len(f.path) for f in files)
        for f in files:
            echo(f"  {f.path:<{width}}  {_size(f.size):>10}")
        base = _adapter_base(staging) if adapter_only else None
        if base and not _is_hub_base(base):
            echo(f"warning: the adapter's base_model_name_or_path is a local path ({base}); others cannot load it "
                 "from the Hub. Train from a Hub id, or edit adapter_config.json before pushing.")
        url = None
        if dry_run:
            source_name = token_source()
            echo("token: " + (f"found ({source_name})" if source_name else f"NOT found; a real push needs one: "
                                                                           f"{LOGIN_HELP}") + ". Nothing was uploaded.")
        else:
            url = upload_staged(staging, settings)
            echo(f"pushed: {url}")
        return {"repo_id": settings.repo_id, "files": [f.path for f in files], "bytes": total, "url": url}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _adapter_base(folder: Path) -> str | None:
    path = folder / "adapter_config.json"
    return json.loads(path.read_text()).get("base_model_name_or_path") if path.is_file() else None


def _is_hub_base(name: str) -> bool:
    return is_hub_id(name)


def push_training_output(output_dir: str | os.PathLike, settings: PushSettings) -> str:
    """The configured push at the end of `hfemb.training.runner.run_training` (merged model + card)."""
    return push(output_dir, settings, echo=log.info)["url"]
