"""Files written whole or not at all, for everything that is read back to decide what to do next
(a run's history, a bundle's manifest, a scoring run's options)."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """Write through a rename: an interrupted write leaves the previous file, never a truncated one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
