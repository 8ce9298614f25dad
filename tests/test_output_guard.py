"""Issue 17: no command overwrites its input (however the output names it), unwritable outputs are refused
before any work, a failed write names the file and leaves the old output, SIGTERM leaves no temporary file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfemb.cli import main
from hfemb.errors import ConfigError, HfembError
from hfemb.io_utils import atomic_open, check_output, same_file

DATA = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes((DATA / "hfemb_mined.jsonl").read_bytes())
    return path


def _aliases(path: Path) -> list[str]:
    """Other names of the same file: a symlink, a hard link, ./name and a path through '..'."""
    link = path.with_name("link.jsonl")
    link.symlink_to(path)
    hard = path.with_name("hard.jsonl")
    os.link(path, hard)
    return [str(path), str(link), str(hard), f"{path.parent}/./{path.name}",
            f"{path.parent}/../{path.parent.name}/{path.name}"]


def test_same_file_sees_links_and_spellings(data_file, tmp_path):
    for alias in _aliases(data_file):
        assert same_file(alias, data_file)
    assert not same_file(tmp_path / "other.jsonl", data_file)
    assert same_file(tmp_path / "new" / ".." / "x.jsonl", tmp_path / "x.jsonl")  # neither exists: resolved paths


@pytest.mark.parametrize("extra", [[], ["--skip-bad"], ["--to", "swift"], ["--to", "flagembedding"]])
def test_convert_never_overwrites_its_input(data_file, extra, capsys):
    before = data_file.read_bytes()
    for alias in _aliases(data_file):
        assert main(["convert", "--input", str(data_file), "--output", alias, *extra]) == 2
        assert "is the input" in capsys.readouterr().err
    assert data_file.read_bytes() == before


def test_mine_split_and_merge_never_overwrite_their_inputs(data_file, tmp_path, capsys):
    before = data_file.read_bytes()
    link, hard, dotted = _aliases(data_file)[1:4]
    assert main(["mine", "--input", str(data_file), "--output", link, "--tokenizer", "regex"]) == 2
    assert main(["mine", "--merge", str(data_file), "--output", hard]) == 2
    assert main(["split", str(data_file), "--dev-out", str(tmp_path / "dev.jsonl"), "--test-out", dotted]) == 2
    assert main(["split", str(data_file), "--dev-out", link, "--test-out", str(tmp_path / "test.jsonl")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all("is the input" in e for e in errors)
    assert data_file.read_bytes() == before
    assert not (tmp_path / "dev.jsonl").exists()  # nothing written before the check


def test_a_file_where_a_folder_is_expected_is_refused_before_loading(data_file, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    # eval: the model does not exist, so only a check made before loading can give this message
    assert main(["eval", "--data", str(DATA / "kuake_mini.json"), "--model", f"m={tmp_path / 'nope'}",
                 "--output-dir", str(blocker), "--no-cache"]) == 2
    assert "is a file, where a folder is expected" in capsys.readouterr().err
    assert main(["eval", "--data", str(DATA / "kuake_mini.json"), "--model", f"m={tmp_path / 'nope'}",
                 "--output-dir", str(blocker / "sub")]) == 2
    assert "is a file, where a folder is expected" in capsys.readouterr().err
    assert main(["convert", "--input", str(data_file), "--output", str(blocker / "out.jsonl")]) == 2
    assert "is a file, where a folder is expected" in capsys.readouterr().err
    assert main(["mine", "--input", str(data_file), "--output", str(tmp_path)]) == 2
    assert "is a folder, where a file is to be written" in capsys.readouterr().err
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"model": {"name_or_path": str(tmp_path / "no-model")},
                                  "data": {"train_file": str(data_file)},
                                  "training": {"output_dir": str(blocker)}}))
    assert main(["train", str(config)]) == 2
    assert "training.output_dir" in capsys.readouterr().err


def test_unwritable_folder_is_refused(tmp_path, monkeypatch):
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(ConfigError, match="locked is not writable"):
        check_output(locked / "sub" / "out.jsonl", option="--output")
    with pytest.raises(ConfigError, match="locked is not writable"):
        check_output(locked, option="--output-dir", folder=True)
    check_output(tmp_path / "ok" / "out.jsonl")  # a folder that can be created is fine


def test_failed_write_names_the_file_and_keeps_the_old_output(tmp_path):
    """A file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG) stands in for a
    full disk."""
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    script = (
        "import resource, sys\n"
        "from hfemb.io_utils import atomic_open\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from hfemb.errors import HfembError\n"
        "try:\n"
        f"    with atomic_open({str(out)!r}) as fh:\n"
        "        for _ in range(1000):\n"
        "            fh.write('x' * 100 + '\\n')\n"
        "except HfembError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{out}: cannot write: File too large")
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_sigterm_while_writing_leaves_no_temporary_file(data_file, tmp_path):
    """`hfemb convert` gets SIGTERM in the middle of writing its output: exit 143, the temporary file removed,
    the old output unchanged (as with Ctrl-C)."""
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    script = (
        "import os, signal, sys\n"
        "import hfemb.commands.convert as convert\n"
        "real = convert.write_records\n"
        "def killed_midway(records, path, *args, **kwargs):\n"
        "    def rows():\n"
        "        for i, record in enumerate(records):\n"
        "            if i == 1:\n"
        "                os.kill(os.getpid(), signal.SIGTERM)\n"
        "            yield record\n"
        "    return real(rows(), path, *args, **kwargs)\n"
        "convert.write_records = killed_midway\n"
        "from hfemb.cli import main\n"
        f"sys.exit(main(['convert', '--input', {str(data_file)!r}, '--output', {str(out)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 143 and proc.stderr.strip().endswith("terminated"), proc.stderr
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "train.jsonl"]


def test_atomic_open_refuses_to_create_in_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(HfembError, match="cannot write"):
        with atomic_open(tmp_path / "f" / "out.json") as fh:
            fh.write("{}")


def test_forked_children_keep_the_default_sigterm():
    """Worker processes (jieba, DataLoader) just end on SIGTERM; only the main process cleans up and reports."""
    import signal

    from hfemb.io_utils import handle_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        handle_sigterm()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, b"1" if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else b"0")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"1"
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
