"""Atomic file writes: a temp file in the same folder, then ``os.replace``. A reader (a sweep
summary, a resumed run) never sees a half-written file, even if the writer is killed mid-write."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
