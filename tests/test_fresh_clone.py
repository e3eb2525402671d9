"""What a new user copies from help texts, recipe comments and the README works on a fresh clone: every
checkpoint an example names is the Hub model, a folder the repository ships, or one an earlier command of the
same comment makes; a comment that says a make target creates something is true of the Makefile; the README's
forced texts are answers the parser splits."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pure.model import HUB_MODEL_ID
from pure.sequence import split_answer_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracked() -> set[str]:
    """The repository's files, as a fresh clone has them."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return set(out.splitlines())


def shipped_checkpoint(folder: str, tracked: set[str]) -> bool:
    return f"{folder.rstrip('/')}/config.json" in tracked


def test_help_examples_name_a_checkpoint_a_fresh_clone_has(tracked):
    from pure import app, infer

    for parser in (app.build_parser(), infer.build_parser()):
        models = re.findall(r"--model (\S+)", parser.epilog or "")
        for model in models:
            assert model == HUB_MODEL_ID or shipped_checkpoint(model, tracked), (parser.prog, model)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes" / "train").glob("*.yaml")))
def test_recipe_comments_make_every_example_folder_they_use(tracked, recipe):
    text = (REPO / "recipes" / "train" / recipe).read_text(encoding="utf-8")
    made: set[str] = set()
    for line in text.splitlines():
        made.update(re.findall(r"make_random_checkpoint (\S+)", line))
        for path in re.findall(r"\b(examples/[\w./-]+)", line):
            root = "/".join(path.split("/")[:2])  # examples/<name>
            assert root in made or path in tracked or shipped_checkpoint(root, tracked), (recipe, line)


def test_what_comments_say_a_make_target_makes_is_in_that_target(tracked):
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = dict(re.findall(r"^([\w-]+):[^\n]*\n((?:\t[^\n]*\n)*)", makefile, flags=re.M))
    for name in sorted(tracked):
        if not name.startswith("recipes/") or not name.endswith((".yaml", ".sh")):
            continue
        for line in (REPO / name).read_text(encoding="utf-8").splitlines():
            claim = re.search(r"(\S+)\s.*made by `make ([\w-]+)`", line)
            if claim:
                folder, target = claim.groups()
                assert folder in targets.get(target, ""), f"{name}: {line.strip()}"


def test_readme_forced_texts_split_into_degradation_and_caption():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    texts = re.findall(r'forced_text="([^"]*)"', readme)

    assert texts
    for text in texts:
        degradation, caption = split_answer_text(text)
        assert degradation and caption, text
