"""Tests for pure.train_vq: recipe parsing, losses, restarts, a few real CPU steps, determinism, resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pure.train.config import ConfigError
from pure.train_vq import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    VQ_DIR,
    Adversary,
    CropSampler,
    TrainSection,
    VQSection,
    build_optimizer,
    centre_crop,
    evaluate,
    load_vq_recipe,
    lr_at,
    main,
    restart_dead_codes,
    train_step,
)
from pure.vq import VQModel, pil_to_pixels

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RECIPE = REPO_ROOT / "recipes" / "pure_tiny" / "vq.yaml"
TINY_VQ = VQSection(codebook_size=64, base_channels=32, channel_mult=[1, 1, 1, 2], z_channels=32)
CROP = 32


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and busy-waiting OpenMP threads on a loaded 2-core machine
    made a 30-step test take minutes instead of seconds. Restored afterwards (runs also set threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smooth_image(seed: int, width: int, height: int) -> Image.Image:
    """A random but learnable image: a coarse noise field upsampled bicubically (gradients, no grain)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vqdata")
    train, holdout = root / "train", root / "holdout"
    train.mkdir()
    holdout.mkdir()
    _smooth_image(0, 56, 48).save(train / "a.png")
    _smooth_image(1, 40, 40).save(train / "b.png")
    _smooth_image(2, 24, 20).save(train / "small.png")  # smaller than the crop: upsampled to fit
    _smooth_image(3, 44, 36).save(holdout / "c.png")  # not a multiple of 8: centre-cropped to 40x32
    _smooth_image(4, 32, 32).convert("RGBA").save(holdout / "d.png")
    return train, holdout


def _args(folders: tuple[Path, Path], out: Path, steps: int, *extra: str) -> list[str]:
    train, holdout = folders
    return [
        "--no-progress",
        "--set",
        f"data.train={train}",
        f"data.holdout={holdout}",
        f"output_dir={out}",
        f"data.crop={CROP}",
        "data.batch_size=2",
        f"train.steps={steps}",
        "train.warmup_steps=2",
        "train.threads=1",
        "train.log_every=2",
        "train.dead_code_after=2",
        "train.dead_code_every=2",
        *extra,
    ]


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "vq:\n"
        f"  codebook_size: {TINY_VQ.codebook_size}\n"
        f"  base_channels: {TINY_VQ.base_channels}\n"
        f"  channel_mult: {TINY_VQ.channel_mult}\n"
        f"  z_channels: {TINY_VQ.z_channels}\n"
        "  num_res_blocks: 1\n"
    )
    return path


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / VQ_DIR / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ------------------------------------------------------------------------------------------------ recipe


def test_unknown_key_lists_valid_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  stepz: 3\n")
    assert main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown key train.stepz" in err and "steps" in err and "warmup_steps" in err


def test_bad_values_and_missing_folders_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_vq_recipe(None, ["vq.base_channels=48", "data.train=x", "data.holdout=y"])
    with pytest.raises(ConfigError, match=r"data\.crop must be a positive multiple of 8"):
        load_vq_recipe(None, ["data.crop=30", "data.train=x", "data.holdout=y"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_vq_recipe(None, ["train.steps=many"])
    overrides = [f"data.train={tmp_path / 'nope'}", f"output_dir={tmp_path / 'run'}"]  # not a finished run
    code = main([str(SHIPPED_RECIPE), "--set", *overrides, "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "nope" in err


def test_lr_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = TrainSection(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=1e-2)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


# ------------------------------------------------------------------------------------------ mechanics


def test_quantize_st_matches_inference_codes_and_passes_gradients() -> None:
    torch.manual_seed(0)
    model = VQModel(TINY_VQ.to_vq_config())
    z = torch.randn(2, 8, 3, 4, requires_grad=True)
    z_q, codebook_loss, commitment_loss, indices = model.quantize.quantize_st(z)
    assert torch.equal(indices, model.quantize.nearest(z))
    # forward: the (normalised) codes, exactly what decode() looks up
    assert torch.allclose(z_q, model.codebook_lookup(indices), atol=1e-6)
    assert codebook_loss.item() == pytest.approx(commitment_loss.item())
    # backward: the decoder's gradient reaches the encoder output (straight through)
    z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    codebook_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_restart_reseeds_dead_codes_from_latents() -> None:
    torch.manual_seed(0)
    model = VQModel(TINY_VQ.to_vq_config())
    optimizer = build_optimizer(model, TrainSection())
    last_used = torch.zeros(64, dtype=torch.int64)
    last_used[:10] = 50  # codes 0-9 recently used, the rest dead
    latents = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    before = model.quantize.embedding.weight.detach().clone()
    n = restart_dead_codes(model, optimizer, latents, last_used, 60, 20, torch.Generator().manual_seed(0))
    after = model.quantize.embedding.weight.detach()
    assert n == 54
    assert torch.equal(after[:10], before[:10])
    # each re-seeded code is a batch latent (up to the tie-breaking noise)
    distance = torch.cdist(after[10:], latents).min(dim=1).values
    assert (distance < 0.01).all()
    assert (last_used[10:] == 60).all()


def test_sampler_upsamples_small_images_and_is_seeded() -> None:
    images = [_smooth_image(0, 20, 12)]
    a = CropSampler(images, CROP, torch.Generator().manual_seed(1)).batch(3)
    b = CropSampler(images, CROP, torch.Generator().manual_seed(1)).batch(3)
    assert a.shape == (3, 3, CROP, CROP) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_loss_goes_down_on_a_fixed_batch() -> None:
    """Overfit check: 30 updates on one batch must cut the loss well below its start."""
    torch.manual_seed(0)
    model = VQModel(TINY_VQ.to_vq_config()).train()
    cfg = TrainSection(steps=30, lr=2e-3, min_lr=2e-3, warmup_steps=0)
    optimizer = build_optimizer(model, cfg)
    pixels = CropSampler([_smooth_image(5, 64, 64)], CROP, torch.Generator().manual_seed(0)).batch(2)
    losses = [train_step(model, optimizer, pixels, step, cfg)[0].loss.item() for step in range(30)]
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_centre_crop_to_multiples() -> None:
    image = _smooth_image(0, 45, 30)
    assert centre_crop(image, 8).size == (40, 24)
    assert centre_crop(image, 8, max_side=16).size == (16, 16)


def test_evaluate_reports_psnr_usage_and_perplexity(folders: tuple[Path, Path]) -> None:
    torch.manual_seed(0)
    model = VQModel(TINY_VQ.to_vq_config())
    images = [Image.open(p).convert("RGB") for p in sorted(folders[1].iterdir())]
    result = evaluate(model, images)
    assert result["images"] == 2 and 0 < result["psnr"] < 60 and 0 < result["psnr_y"] < 60
    assert 0 < result["usage"] <= 1 and 1 <= result["perplexity"] <= 64


# ------------------------------------------------------------------------------------------ real runs


def test_run_writes_loadable_tokenizer_metrics_and_log(
    folders: tuple[Path, Path], tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([str(tiny_recipe), *_args(folders, out, 3)]) == 0
    model = VQModel.from_pretrained(out / VQ_DIR)
    assert model.config == TINY_VQ.to_vq_config()
    codes = model.encode(torch.zeros(1, 3, 16, 24))
    assert codes.shape == (1, 2, 3) and model.decode(codes).shape == (1, 3, 16, 24)
    metrics = json.loads((out / METRICS_NAME).read_text())
    assert metrics["finished"] and metrics["step"] == 3 and metrics["seconds"] > 0
    assert set(metrics["holdout"]) >= {"psnr", "psnr_y", "usage", "perplexity"}
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "train" in events and events[-1] == "eval"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left
    # a finished run says so and exits 0 without training again
    capsys.readouterr()
    assert main([str(tiny_recipe), *_args(folders, out, 3)]) == 0
    assert "already finished" in capsys.readouterr().out


def test_same_recipe_same_weights_and_resume_matches(
    folders: tuple[Path, Path], tiny_recipe: Path, tmp_path: Path
) -> None:
    steps = 6
    first, second, resumed = tmp_path / "first", tmp_path / "second", tmp_path / "resumed"
    assert main([str(tiny_recipe), *_args(folders, first, steps)]) == 0
    assert main([str(tiny_recipe), *_args(folders, second, steps)]) == 0
    _assert_same_weights(first, second)

    # halt at step 3 (checkpoint + unfinished metrics), then rerun: identical to the uninterrupted run
    assert main([str(tiny_recipe), *_args(folders, resumed, steps), "--max-steps", "3"]) == 0
    assert not json.loads((resumed / METRICS_NAME).read_text())["finished"]
    assert torch.load(resumed / CHECKPOINT_NAME, weights_only=True)["step"] == 3
    assert main([str(tiny_recipe), *_args(folders, resumed, steps)]) == 0
    _assert_same_weights(first, resumed)
    assert json.loads((resumed / METRICS_NAME).read_text())["step"] == steps


def test_shipped_recipe_parses_and_runs(folders: tuple[Path, Path], tmp_path: Path) -> None:
    recipe = load_vq_recipe(SHIPPED_RECIPE)
    assert recipe.data.train == "data/pure_tiny/sources/train"
    assert recipe.vq.to_vq_config().downsample == 8
    out = tmp_path / "shipped"
    args = _args(folders, out, 2, "data.holdout_max_side=32", "train.eval_every=0", "train.save_every=0")
    assert main([str(SHIPPED_RECIPE), *args]) == 0
    assert VQModel.from_pretrained(out / VQ_DIR).config == recipe.vq.to_vq_config()


# ------------------------------------------------------------------------------- v2: groups, init, weighting


def test_norm_groups_travel_with_the_weights(tmp_path: Path) -> None:
    default, coarse = (
        TINY_VQ.to_vq_config(),
        VQSection(**{**TINY_VQ.__dict__, "norm_groups": 8}).to_vq_config(),
    )
    assert "norm_groups" not in default.to_dict()  # LlamaGen-style config.json files stay as they were
    assert coarse.to_dict()["norm_groups"] == 8
    model = VQModel(coarse)
    assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    model.save_pretrained(tmp_path / "vq")
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    assert loaded.config == coarse
    assert {m.num_groups for m in loaded.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(model.eval().encode(x), loaded.encode(x))
    with pytest.raises(ValueError, match="norm_groups"):
        VQSection(norm_groups=3).to_vq_config()


def test_init_from_starts_at_the_given_weights(
    folders: tuple[Path, Path], tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first"
    assert main([str(tiny_recipe), *_args(folders, first, 2)]) == 0
    again = tmp_path / "again"
    args = _args(folders, again, 1, "train.lr=1e-12", "train.min_lr=0", f"train.init_from={first / VQ_DIR}")
    assert main([str(tiny_recipe), *args]) == 0
    assert "starting from" in capsys.readouterr().out
    a, b = _weights(first), _weights(again)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a if "codebook_used" not in k)
    other = tmp_path / "other"
    wrong = _args(folders, other, 1, f"train.init_from={first / VQ_DIR}", "vq.codebook_size=32")
    assert main([str(tiny_recipe), *wrong]) == 2


def test_weight_by_area_draws_large_images_more_often() -> None:
    big, small = _smooth_image(0, 128, 128), _smooth_image(1, 32, 32)
    sampler = CropSampler([small, big], CROP, torch.Generator().manual_seed(0), weight_by_area=True)
    assert sampler.weights.tolist() == pytest.approx([1 / 17, 16 / 17])
    picks = [sampler._pick().shape[1] for _ in range(200)]
    assert 170 < picks.count(128) < 200


def test_decoder_only_keeps_every_code_and_trains_the_decoder(
    folders: tuple[Path, Path], tiny_recipe: Path, tmp_path: Path
) -> None:
    start = tmp_path / "start"
    assert main([str(tiny_recipe), *_args(folders, start, 2)]) == 0
    tuned, tune = (
        tmp_path / "tuned",
        (f"train.init_from={start / VQ_DIR}", "train.decoder_only=true", "train.lr=1e-2"),
    )
    assert main([str(tiny_recipe), *_args(folders, tuned, 3, *tune)]) == 0
    a, b = _weights(start), _weights(tuned)
    assert a.keys() == b.keys()
    chooses = [k for k in a if k.startswith(("encoder.", "quant_conv.", "quantize.embedding"))]
    renders = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert chooses and renders
    assert all(torch.equal(a[k], b[k]) for k in chooses)  # no restarts, no updates
    assert any(not torch.equal(a[k], b[k]) for k in renders)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    before, after = VQModel.from_pretrained(start / VQ_DIR), VQModel.from_pretrained(tuned / VQ_DIR)
    codes = before.encode(x)
    assert torch.equal(codes, after.encode(x))
    assert not torch.equal(before.decode(codes), after.decode(codes))
    # halted and rerun, it ends where the uninterrupted run did (the optimiser holds the decoder's state only)
    resumed = tmp_path / "resumed"
    assert main([str(tiny_recipe), *_args(folders, resumed, 3, *tune), "--max-steps", "1"]) == 0
    assert main([str(tiny_recipe), *_args(folders, resumed, 3, *tune)]) == 0
    _assert_same_weights(tuned, resumed)
    # without a tokenizer to keep the codes of, it is a recipe error
    assert main([str(tiny_recipe), *_args(folders, tmp_path / "no", 1, "train.decoder_only=true")]) == 2


# ------------------------------------------------------------------------------------ adversarial decoder


def test_discriminator_learns_real_from_drawn_and_the_generator_loss_only_moves_pixels() -> None:
    torch.manual_seed(0)
    cfg = TrainSection(lr=2e-3, disc_channels=8, disc_layers=2)
    adversary = Adversary(cfg)
    real = torch.stack([pil_to_pixels(_smooth_image(s, CROP, CROP)) for s in range(4)])
    fake = torch.rand(4, 3, CROP, CROP) * 2 - 1  # grain no smooth image has
    losses = [float(adversary.update(real, fake, cfg.lr)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]  # hinge loss from ~1 towards 0: it tells them apart
    with torch.no_grad():
        assert float(adversary.disc(real).mean()) > float(adversary.disc(fake).mean())

    drawn = fake.clone().requires_grad_(True)
    grads = [p.grad.clone() for p in adversary.disc.parameters()]  # left by the last update
    adversary.generator_loss(drawn).backward()
    assert drawn.grad is not None and float(drawn.grad.abs().sum()) > 0
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, adversary.disc.parameters(), strict=True))
    assert all(p.requires_grad for p in adversary.disc.parameters())  # switched back on for its own update


def test_gan_start_holds_the_adversary_back() -> None:
    torch.manual_seed(0)
    cfg = TrainSection(lr=1e-3, warmup_steps=0, gan_weight=0.5, gan_start=2, disc_channels=8, disc_layers=2)
    model, adversary = VQModel(TINY_VQ.to_vq_config()).train(), Adversary(cfg)
    optimizer = build_optimizer(model, cfg)
    pixels = torch.stack([pil_to_pixels(_smooth_image(s, CROP, CROP)) for s in range(2)])
    before = {k: v.clone() for k, v in adversary.disc.state_dict().items()}
    out, _ = train_step(model, optimizer, pixels, 1, cfg, adversary)
    assert float(out.gan_g) == 0.0 and float(out.gan_d) == 0.0
    assert all(torch.equal(before[k], v) for k, v in adversary.disc.state_dict().items())
    out, _ = train_step(model, optimizer, pixels, 2, cfg, adversary)
    assert float(out.gan_d) > 0.0 and float(out.gan_g) != 0.0
    assert any(not torch.equal(before[k], v) for k, v in adversary.disc.state_dict().items())


def test_adversarial_decoder_keeps_codes_checkpoints_its_discriminator_and_resumes_exactly(
    folders: tuple[Path, Path], tiny_recipe: Path, tmp_path: Path
) -> None:
    start = tmp_path / "start"
    assert main([str(tiny_recipe), *_args(folders, start, 2)]) == 0
    assert "adversary" not in torch.load(start / CHECKPOINT_NAME, weights_only=True)  # off by default
    assert not any("gan_g" in line for line in (start / "log.jsonl").read_text().splitlines())
    tune = (
        f"train.init_from={start / VQ_DIR}",
        "train.decoder_only=true",
        "train.gan_weight=0.5",
        "train.disc_channels=8",
        "train.disc_layers=2",
    )
    tuned = tmp_path / "tuned"
    assert main([str(tiny_recipe), *_args(folders, tuned, 4, *tune)]) == 0
    state = torch.load(tuned / CHECKPOINT_NAME, weights_only=True)
    assert set(state["adversary"]) == {"disc", "optimizer"}
    logged = [json.loads(line) for line in (tuned / "log.jsonl").read_text().splitlines()]
    assert all(r["gan_d"] > 0 for r in logged if r["event"] == "train")
    x = torch.rand(2, 3, CROP, CROP) * 2 - 1
    before, after = VQModel.from_pretrained(start / VQ_DIR), VQModel.from_pretrained(tuned / VQ_DIR)
    assert torch.equal(before.encode(x), after.encode(x))
    # halted after 2 steps and rerun: tokenizer and discriminator end where the uninterrupted run's did
    resumed = tmp_path / "resumed"
    assert main([str(tiny_recipe), *_args(folders, resumed, 4, *tune), "--max-steps", "2"]) == 0
    assert main([str(tiny_recipe), *_args(folders, resumed, 4, *tune)]) == 0
    _assert_same_weights(tuned, resumed)
    again = torch.load(resumed / CHECKPOINT_NAME, weights_only=True)["adversary"]["disc"]
    assert all(torch.equal(v, again[k]) for k, v in state["adversary"]["disc"].items())
    # and the weight matters: the same run without the adversary decodes differently
    plain = tmp_path / "plain"
    assert main([str(tiny_recipe), *_args(folders, plain, 4, *tune[:2])]) == 0
    assert not torch.equal(
        _weights(plain)["decoder.conv_out.weight"], _weights(tuned)["decoder.conv_out.weight"]
    )
    assert main([str(tiny_recipe), *_args(folders, tmp_path / "bad", 1, "train.gan_weight=-1")]) == 2
