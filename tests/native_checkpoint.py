"""A copy of the tiny checkpoint whose ``config.json`` names its native image size (shared by the tests of
the restorer, the CLI, tiling and the demo): every default size must follow it, not PURE's 512."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pure.restorer import IMAGE_SIZE_KEY

NATIVE_SIZE = 64  # small, so a restoration at the default size is fast; 16, 32 and 64 px are x4, x2, x1


def native_size_checkpoint(source: Path, folder: Path, size: int | None = NATIVE_SIZE) -> Path:
    """Copy ``source`` to ``folder`` with ``config.json``'s :data:`IMAGE_SIZE_KEY` set to ``size`` (any JSON
    value, to test bad ones too)."""
    shutil.copytree(source, folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config[IMAGE_SIZE_KEY] = size
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
