"""The per-file calls of SYNC_MODE=group (`files.HeldCalls`) on a real directory: they do
what the os module's calls do, fail the same way, and stop holding the interpreter lock
once they are slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.consumer import files
from services.consumer.files import HeldCalls, sync_filesystem

pytestmark = pytest.mark.skipif(not files.syncfs_available(), reason="Linux 5.8+ only")


@pytest.mark.parametrize("hold", [True, False])
def test_a_file_written_checked_and_renamed_holds_its_bytes(tmp_path: Path, hold: bool) -> None:
    calls = HeldCalls(hold)
    assert calls.holding is hold
    data = b"x" * 100_000  # more than one page
    fd = calls.write_unflushed(str(tmp_path / ".a.tmp"), data)
    sync_filesystem(tmp_path)
    calls.check_written(fd)
    calls.rename(str(tmp_path / ".a.tmp"), str(tmp_path / "a"))
    assert (tmp_path / "a").read_bytes() == data
    assert not (tmp_path / ".a.tmp").exists()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # closed by the check


@pytest.mark.parametrize("hold", [True, False])
def test_failures_are_the_os_modules_errors_naming_the_path(tmp_path: Path, hold: bool) -> None:
    calls = HeldCalls(hold)
    (tmp_path / "there").write_bytes(b"")
    with pytest.raises(FileExistsError, match="there"):
        calls.write_unflushed(str(tmp_path / "there"), b"a")
    with pytest.raises(FileNotFoundError, match="missing"):  # the group makes the directory
        calls.write_unflushed(str(tmp_path / "missing" / "a"), b"a")
    with pytest.raises(FileNotFoundError, match="gone"):
        calls.rename(str(tmp_path / "gone"), str(tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]


def group(calls: HeldCalls, path: Path) -> None:
    os.close(calls.write_unflushed(str(path), b"x"))
    calls.group_done()


def test_calls_slow_group_after_group_stop_holding_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = HeldCalls()
    group(calls, tmp_path / "a")
    assert calls.holding  # a local disk: microseconds
    monkeypatch.setattr(files, "HOLD_LIMIT_SECONDS", 0.0)  # every call is "slow" now
    for n in range(files.SLOW_GROUPS - 1):
        group(calls, tmp_path / f"slow{n}")
    monkeypatch.setattr(files, "HOLD_LIMIT_SECONDS", 10.0)  # one fast group: not in a row
    group(calls, tmp_path / "fast")
    monkeypatch.setattr(files, "HOLD_LIMIT_SECONDS", 0.0)
    for n in range(files.SLOW_GROUPS - 1):
        group(calls, tmp_path / f"again{n}")
    assert calls.holding
    group(calls, tmp_path / "last")  # the SLOW_GROUPS-th slow group in a row
    assert not calls.holding
    os.close(calls.write_unflushed(str(tmp_path / "c"), b"c"))  # the releasing calls
    assert (tmp_path / "c").read_bytes() == b"c"
