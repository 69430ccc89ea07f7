"""refimpl.fileio's publishing, the one used by packed datasets, checkpoints and traces
(their own tests: test_packed.py, test_resume.py, test_fault_drill.py, test_oracle*.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl import fileio
from refimpl.fileio import atomic_file, publish, remove_stale_temporaries, staging_dir


def test_publish_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    src = staging_dir(tmp_path, "ds")
    (src / "sub").mkdir()
    (src / "a").write_text("1")
    (src / "sub" / "b").write_text("2")
    events, rename = [], os.rename
    monkeypatch.setattr(fileio, "fsync_path", lambda p: events.append(("fsync", Path(p).name)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", Path(b).name)),
                                                    rename(a, b))[1])
    publish([(src, tmp_path / "ds")])
    assert sorted(events[:4]) == [("fsync", n) for n in sorted(["a", "b", "sub", src.name])]
    assert events[4:] == [("rename", "ds"), ("fsync", tmp_path.name)]  # then the rename, durable
    assert (tmp_path / "ds" / "sub" / "b").read_text() == "2"


def test_atomic_file_is_whole_or_not_at_all(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(path) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_file(path) as f:
        f.write(b"new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_only_a_dead_writers_temporary_file_is_removed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".latest.tmp-{fileio.HOST}-{child.pid}-0123abcd"
    alive = tmp_path / f".latest.tmp-{fileio.HOST}-{os.getpid()}-0123abcd"
    other = tmp_path / f".latest.tmp-another_host-{child.pid}-0123abcd"
    for p in (dead, alive, other):
        p.write_text("half")
    assert remove_stale_temporaries(tmp_path, "latest") == [dead]
    assert sorted(tmp_path.iterdir()) == sorted([alive, other])
