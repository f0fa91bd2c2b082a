"""write_atomic: the one way pipefold writes a file (reports, schedules, costs, plots)."""

from __future__ import annotations

import pytest

from pipefold.files import write_atomic


def test_creates_parents_and_leaves_no_temporary(tmp_path):
    path = write_atomic(tmp_path / "charts" / "a.json", "{}\n")
    assert path == tmp_path / "charts" / "a.json" and path.read_text() == "{}\n"
    write_atomic(path, b"[]")  # replacing goes through os.replace as well
    assert path.read_bytes() == b"[]"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_new_files_are_readable_by_others_and_a_replaced_file_keeps_its_mode(tmp_path):
    path = write_atomic(tmp_path / "trace.json", "{}")
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    write_atomic(path, "{}")
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_atomic(tmp_path / "s.json", "old")
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
