"""A work directory that is a file, that cannot be written, or on a full disk: one clear line,
before any model load (a full disk during a save: tests/train/test_checkpoint.py)."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gxpo.train.checkpoint import prepare_workdir

REPO = Path(__file__).resolve().parents[2]


def test_a_writable_directory_is_created_and_left_clean(tmp_path):
    path = prepare_workdir(tmp_path / "a" / "run")
    assert path.is_dir() and list(path.iterdir()) == []


def test_a_file_is_not_a_work_directory(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"Work directory {file} is an existing file"):
        prepare_workdir(file)
    with pytest.raises(OSError, match=rf"Work directory {file}/run cannot be written"):
        prepare_workdir(file / "run")  # below a file


def _refuse_writes_below(monkeypatch, directory, error):
    """Makes os.open of a path below ``directory`` for writing fail with ``error``, as the
    kernel does for a read-only directory or a full disk (root ignores permissions)."""
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path).startswith(str(directory)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


def test_an_unwritable_directory_is_one_line(tmp_path, monkeypatch):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    if os.geteuid() == 0:  # chmod does not stop root: refuse the write instead
        _refuse_writes_below(monkeypatch, workdir, errno.EACCES)
    else:
        workdir.chmod(0o500)
    try:
        with pytest.raises(OSError) as err:
            prepare_workdir(workdir)
    finally:
        workdir.chmod(0o700)
    msg = str(err.value)
    assert msg.startswith(f"Work directory {workdir} cannot be written (Permission denied)")
    assert "--workdir" in msg and "\n" not in msg


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match=r"cannot be written \(the disk is full\)"):
        prepare_workdir(tmp_path / "run")
    monkeypatch.undo()
    assert list((tmp_path / "run").iterdir()) == []  # the probe file is gone


def test_launch_prints_one_line_and_exits_2(tmp_path):
    file = tmp_path / "run"
    file.write_text("x")
    out = subprocess.run(
        [sys.executable, "launch.py", "--config=configs/tiny.py", f"--workdir={file}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: Work directory {file} is an existing file"), lines
    assert "Traceback" not in out.stderr
