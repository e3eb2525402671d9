"""`pure.data.synthetic_images`: scenes are deterministic under a seed, their captions state exactly their
parameters (and the parser reads them back), the named colours are the ones drawn, files are resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pure.data import synthetic_images as si


def test_same_seed_same_scene_and_pixels_other_seed_other():
    a, b = si.sample_scene(7), si.sample_scene(7)
    assert a == b
    assert si.render_scene(a).tobytes() == si.render_scene(b).tobytes()
    assert si.sample_scene(8) != a
    assert si.render_scene(si.sample_scene(8)).tobytes() != si.render_scene(a).tobytes()
    image = si.render_scene(si.sample_scene(7, size=64))
    assert image.size == (64, 64) and image.mode == "RGB"


def test_captions_state_the_parameters_and_read_back():
    backgrounds, kinds, texts = set(), set(), set()
    for seed in range(300):
        scene = si.sample_scene(seed)
        caption = si.caption_for(scene)
        truth = si.scene_attributes(scene)
        assert si.caption_attributes(caption) == truth, (seed, caption)
        assert si.attribute_scores(si.caption_attributes(caption), truth)["mean"] == 1.0
        assert caption[0].isupper() and caption.endswith(".") and " a o" not in caption  # "an orange"
        backgrounds.add(scene.background)
        kinds.update(truth["kinds"])
        texts.add(truth["text"])
    assert backgrounds == set(si.BACKGROUND_KINDS) and kinds == set(si.SHAPE_KINDS) and texts == {True, False}


def test_caption_counts_and_groups_by_colour_and_kind():
    scene = si.sample_scene(0)
    red = dict(kind="disc", colour="red", rgb=si.COLOURS["red"], cx=0.5, cy=0.5, radius=0.2, angle=0.0)
    scene.shapes = [si.Shape(**red), si.Shape(**red), si.Shape(**{**red, "kind": "star", "colour": "blue"})]
    scene.background, scene.colours, scene.text = "plain", ["white"], None
    assert si.caption_for(scene) == "Two red discs and a blue star over a plain white background."
    scene.text = si.Text(words=["stop"], colour="black", rgb=(0, 0, 0), x=0.1, y=0.1, height=0.2)
    assert si.caption_for(scene).endswith("background, with black text.")


def test_the_named_colour_is_the_drawn_colour():
    checked = 0
    for seed in range(60):
        scene = si.sample_scene(seed)
        top = scene.shapes[-1]
        if top.kind == "ring" or top.striped or scene.text is not None:
            continue  # a ring's centre is hollow; stripes and text cover the fill
        pixel = np.asarray(si.render_scene(scene))[int(top.cy * scene.size), int(top.cx * scene.size)]
        nearest = min(si.COLOURS, key=lambda name: np.abs(np.asarray(si.COLOURS[name]) - pixel).sum())
        assert nearest == top.colour, (seed, pixel)
        checked += 1
        if checked == 8:
            break
    assert checked == 8


def test_attribute_scores_grade_partial_answers():
    truth = si.caption_attributes(
        "Two red discs and a blue star over a blue-to-white gradient, with black text."
    )
    wrong = si.caption_attributes("A red square over a mottled grey texture.")
    scores = si.attribute_scores(wrong, truth)
    assert scores["kinds"] == 0.0 and scores["colours"] == 0.5
    assert scores["background"] == 0.0 and scores["background_colours"] == 0.0 and scores["text"] == 0.0
    assert scores["mean"] == pytest.approx(0.1)
    nonsense = si.caption_attributes("A grey photo of old coins on a dark background.")
    assert nonsense["background"] is None and nonsense["kinds"] == []


def test_write_scenes_adds_only_what_is_missing(tmp_path, capsys):
    assert si.main(["--out", str(tmp_path), "--split", "holdout", "--count", "3", "--size", "32"]) == 0
    assert si.main(["--out", str(tmp_path), "--split", "holdout", "--count", "4", "--size", "32"]) == 0
    assert "wrote 1 scenes" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [e["file"] for e in lines] == [f"scene_{i:06d}.png" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "holdout").iterdir()) == [e["file"] for e in lines]
    assert lines[2]["caption"] == si.caption_for(si.sample_scene(2, 32))
    assert lines[2]["scene"]["seed"] == 2
    assert si.main(["--out", str(tmp_path), "--count", "0"]) == 2
