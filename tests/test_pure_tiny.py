"""The shipped PURE-tiny checkpoint (examples/pure-tiny): it loads, restores deterministically, and still
scores what its model card says on held-out images, so a broken pipeline shows up as a changed number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pure.data.sample_images import load_source, read_sources
from pure.eval.holdout import measure_holdout
from pure.restorer import PureRestorer

SHIPPED = Path("examples/pure-tiny")
SOURCES = "recipes/pure_tiny/sources.yaml"
PINNED_IMAGES = ("astronaut", "camera")  # hold-out images re-measured here (the card measures all five)
PINNED_METHODS = ("bicubic", "vq", "pure")
PSNR_TOLERANCE_DB = 0.05  # same machine, same seeds: anything above float noise is a changed pipeline
SSIM_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def restorer():
    torch.set_num_threads(1)
    return PureRestorer.from_pretrained(SHIPPED, device="cpu")


@pytest.fixture(scope="module")
def holdout_images():
    entries = {e["name"]: e for e in read_sources(SOURCES)}
    assert all(entries[name]["split"] == "holdout" for name in PINNED_IMAGES)
    # keyed like the card's run over the files data/pure_tiny/sources/holdout/NAME.png
    return {f"{name}.png": load_source(entries[name]["source"]) for name in PINNED_IMAGES}


def test_shipped_checkpoint_is_small_and_native_128(restorer):
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 50e6
    assert restorer.image_size == 128
    assert restorer.vq.config.codebook_size == restorer.tokenizer.vocab.codebook_size


def test_restores_a_holdout_image_deterministically_under_a_seed(restorer, holdout_images):
    hq = holdout_images["astronaut.png"].crop((192, 64, 320, 192))
    lq = hq.resize((32, 32))
    a, b = (restorer.restore(lq, seed=3) for _ in range(2))
    c = restorer.restore(lq, seed=4)
    assert a.image.size == (128, 128)
    assert torch.equal(a.codes, b.codes) and a.image.tobytes() == b.image.tobytes() and a.text == b.text
    assert not torch.equal(a.codes, c.codes)
    assert a.degradation is not None  # a trained model writes its Perceive sentence


def test_holdout_scores_match_the_model_card(restorer, holdout_images):
    card = json.loads((SHIPPED / "holdout_results.json").read_text())
    seed = card["protocol"]["seeds"][0]
    results = measure_holdout(
        restorer,
        holdout_images,
        crop=card["protocol"]["crop"],
        crops_per_image=card["protocol"]["crops_per_image"],
        seeds=[seed],
        methods=PINNED_METHODS,
    )
    shipped = {
        (r["image"], r["crop"], r["method"]): r
        for r in card["rows"]
        if r["seed"] == seed and r["image"] in holdout_images and r["method"] in PINNED_METHODS
    }
    crops = card["protocol"]["crops_per_image"]
    assert len(results["rows"]) == len(shipped) == len(PINNED_IMAGES) * crops * len(PINNED_METHODS)
    for row in results["rows"]:
        pinned = shipped[(row["image"], row["crop"], row["method"])]
        assert row["psnr_y"] == pytest.approx(pinned["psnr_y"], abs=PSNR_TOLERANCE_DB), row["method"]
        assert row["ssim_y"] == pytest.approx(pinned["ssim_y"], abs=SSIM_TOLERANCE), row["method"]
