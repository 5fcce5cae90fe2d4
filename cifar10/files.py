"""Files written whole or not at all, for everything that is read back to decide what to do next
(a run's checkpoint, history and summary, a bundle's manifest, a scoring run's parts and options)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def written_whole(path: Path, write: Callable[[Path], object]) -> None:
    """write(a temporary path beside `path`), then rename it to `path`: an interrupted write leaves the
    previous file, or none, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_whole(path: Path, text: str) -> None:
    written_whole(path, lambda tmp: tmp.write_text(text))
