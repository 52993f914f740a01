"""A spy on os.fsync: which files and directories were made durable, in order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def fsync_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, int]]:
    """Records the path (as it was named then) and the inode of every fsync from now on
    (the real one still runs)."""
    synced: list[tuple[Path, int]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), os.fstat(fd).st_ino))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced
