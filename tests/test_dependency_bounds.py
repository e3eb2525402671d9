"""pyproject.toml's lower bounds are the versions `make test-oldest` tests (constraints-oldest.txt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
# Declared below the tested version, and why (constraints-oldest.txt says it too).
UNTESTED_BELOW = {"torch": "2.11: the GPU machine's; 2.13.0 is the oldest CPU build that installs here"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared_lower_bounds() -> dict[str, set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    bounds = {}
    for requirement in requirements:
        found = re.search(r">=\s*([\w.]+)", requirement)
        if found:
            bounds.setdefault(_name(requirement), set()).add(found.group(1))
    return bounds


def oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints-oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    return pins


def _release(version: str) -> tuple[int, ...]:
    """``"0.8"`` and ``"0.8.0"`` alike: (0, 8)."""
    parts = [int(part) for part in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_every_oldest_pin_is_the_declared_lower_bound():
    bounds, pins = declared_lower_bounds(), oldest_pins()
    assert {"torch", "transformers", "huggingface-hub", "tokenizers", "safetensors", "peft"} <= pins.keys()
    for name, pinned in pins.items():
        assert name in bounds, f"constraints-oldest.txt pins {name}, which pyproject.toml does not declare"
        assert len(bounds[name]) == 1, f"pyproject.toml gives {name} different lower bounds: {bounds[name]}"
        (declared,) = bounds[name]
        if name in UNTESTED_BELOW:
            assert _release(declared) <= _release(pinned), name
        else:
            assert _release(declared) == _release(pinned), (
                f"pyproject.toml says {name}>={declared} but make test-oldest tests {pinned}: "
                "change both together"
            )


def test_the_oldest_pins_are_what_the_main_constraints_never_go_below():
    main = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==")
            main[_name(name)] = version.strip()
    for name, pinned in oldest_pins().items():
        assert _release(main[name]) >= _release(pinned), (
            f"constraints.txt pins {name} below the oldest declared"
        )
