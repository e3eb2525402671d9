"""Train a LlamaGen-style VQ image tokenizer (:mod:`pure.vq`) from scratch, on a CPU if need be.

``python -m pure.train_vq RECIPE.yaml [--set a.b=v ...] [--max-steps N]`` (see ``--help``).

Why this exists: PURE-tiny needs a small tokenizer whose codebook matches its vocabulary, and the released
LlamaGen VQ-8 (16384 codes, 70M parameters) is neither small nor available offline. This trains the same
architecture (:class:`pure.vq.VQModel`, same state-dict keys) at a small width on a folder of HQ images:

- data: every image is decoded once into memory (the sets are tens of images); each step draws random
  ``crop`` px crops with random horizontal flips from a generator seeded by ``train.seed``;
- loss: L1 + L2 reconstruction in [-1, 1] + VQ codebook loss + ``beta`` * commitment loss with a
  straight-through estimator, on L2-normalised latents/codes (LlamaGen). Optionally (``train.gan_weight``)
  VQGAN's and LlamaGen's adversarial loss: a PatchGAN discriminator, trained from scratch beside the
  tokenizer with the hinge loss, and the generator's ``-mean(D(recon))``; without it the decoder draws the
  mean of what a code may stand for, blurred edges included. No perceptual (LPIPS) loss: its VGG weights
  cannot be downloaded here;
- dead codes (unused for ``dead_code_after`` steps) are re-seeded from random encoder outputs of the
  batch, because a small codebook otherwise collapses to a handful of codes;
- evaluation uses the real inference path (:meth:`VQModel.encode` -> :meth:`VQModel.decode` -> uint8), so
  the hold-out PSNR is what users of the saved tokenizer get; it also reports codebook usage (fraction of
  codes the hold-out uses) and the perplexity of the code histogram.

Run folder (``output_dir``): ``recipe.yaml`` (resolved recipe), ``log.jsonl`` (one JSON object per log
line), ``checkpoint.pt`` (model, optimiser, step, data RNG: rerunning the same recipe resumes from it),
``vq/`` (``VQModel.save_pretrained``; loads with ``VQModel.from_pretrained``; replaced atomically) and
``metrics.json`` (final hold-out PSNR, usage, steps, seconds). Relative data and output paths are taken
relative to the current directory (run from the repository root).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP (it reads this once, at load): with the default busy-waiting threads a training
# step on a shared 2-core machine was measured 5x slower (3.1 s vs 0.62 s); passive waiting costs nothing
# on an idle machine. Only a default: an explicit OMP_WAIT_POLICY wins, and it has no effect when torch
# was imported before this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import io
import json
import math
import pickle
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor

from pure.imageio import atomic_write, load_image
from pure.train.config import ConfigError, add_set_argument, load_yaml_dataclass
from pure.vq import VQConfig, VQModel, pil_to_pixels, pixels_to_pil, to_rgb

RECIPE_NAME = "recipe.yaml"
LOG_NAME = "log.jsonl"
METRICS_NAME = "metrics.json"
CHECKPOINT_NAME = "checkpoint.pt"
VQ_DIR = "vq"
# Extensions looked for in the data folders (anything else, e.g. README files, is ignored).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
# BT.601 studio-swing luma (MATLAB rgb2ycbcr), the Y-channel PSNR convention of super-resolution papers.
Y_OFFSET = 16.0
Y_WEIGHTS = (65.481, 128.553, 24.966)
PIXEL_MAX = 255.0
# Probability of a horizontal flip of each training crop.
FLIP_PROBABILITY = 0.5
# Std of the noise added to re-seeded codes (latents are unit vectors when the codebook is L2-normalised).
RESTART_NOISE = 1e-3
# Exit status for bad recipes, missing folders and unreadable data (argparse's usage-error code).
EXIT_USAGE = 2
# Schema version of checkpoint.pt, checked on resume.
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Recipe
# ---------------------------------------------------------------------------------------------------------


@dataclass
class VQSection:
    """The tokenizer architecture (:class:`pure.vq.VQConfig` fields). Defaults: a small VQ-8."""

    codebook_size: int = 1024
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    """Keep LlamaGen's ``quantize.codebook_used`` buffer so the state dict has LlamaGen's keys."""
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2])
    z_channels: int = 32
    num_res_blocks: int = 1
    norm_groups: int = 32
    """Groups of every GroupNorm (see :class:`pure.vq.VQConfig`); LlamaGen's 32 by default."""

    def to_vq_config(self) -> VQConfig:
        return VQConfig(**dataclasses.asdict(self))


@dataclass
class DataSection:
    train: str = ""
    """Folder of HQ training images (searched recursively)."""
    holdout: str = ""
    """Folder of held-out images, only evaluated."""
    crop: int = 64
    """Side of the square random training crops, px; a multiple of the VQ downsample factor."""
    batch_size: int = 8
    weight_by_area: bool = False
    """Draw each crop's image with probability proportional to its area (after ``fit_min_side``) rather
    than uniformly, so that a few large photos are not drowned by thousands of small generated images."""
    holdout_max_side: int = 512
    """Hold-out images are centre-cropped to at most this many px per side (bounds CPU time and the
    memory of the mid-block attention over all positions); 0 = whole images. Then to a multiple of 8."""


@dataclass
class TrainSection:
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    """End of the cosine decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    """AdamW decay of the conv weights only (biases, norms and the L2-normalised codebook are not decayed)."""
    warmup_steps: int = 50
    beta: float = 0.25
    """Commitment loss weight (LlamaGen: 0.25)."""
    codebook_weight: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    grad_clip: float = 1.0
    """Max global gradient norm; 0 = no clipping."""
    dead_code_after: int = 100
    """Codes unused in training batches for this many steps are re-seeded from encoder outputs; 0 = off."""
    dead_code_every: int = 20
    """Steps between dead-code checks."""
    seed: int = 0
    init_from: str = ""
    """A ``VQModel.save_pretrained`` folder of the same architecture to start from (fine-tuning a tokenizer
    on new data) instead of a random initialisation; ignored when resuming from a checkpoint."""
    decoder_only: bool = False
    """Train ``post_quant_conv`` and the decoder only (needs ``init_from``): the encoder, ``quant_conv``
    and the codebook keep ``init_from``'s weights, so every image keeps its codes and a model trained on
    them stays valid; only how codes become pixels improves. The loss is L1 + L2 (+ the adversarial term)
    and there are no dead-code restarts (the codebook is frozen)."""
    gan_weight: float = 0.0
    """Weight of the adversarial (generator) loss ``-mean(D(recon))``; 0 = off, no discriminator (LlamaGen:
    0.5). The PatchGAN discriminator trains on the same crops with the hinge loss, AdamW at the tokenizer's
    learning rate and betas, and is checkpointed with it."""
    gan_start: int = 0
    """Step from which the discriminator trains and the adversarial term counts (LlamaGen: 20000, after
    the reconstruction has converged; 0 suits a tokenizer tuned from a trained one)."""
    disc_channels: int = 64
    """Width of the discriminator's first layer (doubling per layer, at most 8x)."""
    disc_layers: int = 3
    """Strided layers of the discriminator (3: a 70 px receptive field, pix2pix's PatchGAN)."""
    threads: int = 0
    """torch CPU threads; 0 = torch's default."""
    log_every: int = 10
    eval_every: int = 0
    """Hold-out evaluation every N steps (0 = only at the end)."""
    save_every: int = 100
    """Checkpoint every N steps (0 = only at the end)."""


@dataclass
class VQRecipe:
    output_dir: str = "runs/vq"
    vq: VQSection = field(default_factory=VQSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> VQRecipe:
        """Cross-field checks; raises :class:`ConfigError` saying what to change."""
        try:
            vq_config = self.vq.to_vq_config()
        except ValueError as err:
            raise ConfigError(f"vq: {err}") from None
        d, t, ds = self.data, self.train, vq_config.downsample
        checks = [
            (bool(d.train), "data.train: give the folder of training images"),
            (bool(d.holdout), "data.holdout: give the folder of held-out images"),
            (d.crop > 0 and d.crop % ds == 0, f"data.crop must be a positive multiple of {ds}; got {d.crop}"),
            (d.batch_size > 0, "data.batch_size must be > 0"),
            (d.holdout_max_side == 0 or d.holdout_max_side >= ds, f"data.holdout_max_side: 0 or >= {ds}"),
            (t.steps > 0, "train.steps must be > 0"),
            (t.lr > 0 and 0 <= t.min_lr <= t.lr, "need train.lr > 0 and 0 <= train.min_lr <= train.lr"),
            (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas: two values in [0, 1)"),
            (
                min(t.weight_decay, t.warmup_steps, t.beta, t.codebook_weight, t.grad_clip) >= 0,
                "train.weight_decay, warmup_steps, beta, codebook_weight and grad_clip must be >= 0",
            ),
            (t.l1_weight >= 0 and t.l2_weight >= 0 and t.l1_weight + t.l2_weight > 0, "train.l1/l2_weight"),
            (t.dead_code_after >= 0 and t.dead_code_every > 0, "train.dead_code_after >= 0, _every > 0"),
            (min(t.threads, t.eval_every, t.save_every) >= 0, "train.threads/eval_every/save_every >= 0"),
            (t.log_every > 0, "train.log_every must be > 0"),
            (bool(t.init_from) or not t.decoder_only, "train.decoder_only needs train.init_from's codes"),
            (t.gan_weight >= 0 and t.gan_start >= 0, "train.gan_weight and train.gan_start must be >= 0"),
            (t.disc_channels > 0 and t.disc_layers > 0, "train.disc_channels and disc_layers must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


def load_vq_recipe(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> VQRecipe:
    """A recipe YAML (defaults when ``path`` is None) plus ``a.b=value`` overrides, type-checked."""
    return load_yaml_dataclass(VQRecipe, path, overrides).validate()


def recipe_to_yaml(recipe: VQRecipe) -> str:
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False, default_flow_style=None, width=100)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike, what: str) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, so the order never depends on the file system)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist (or is not a folder)")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise FileNotFoundError(f"{what} folder {folder} holds no images ({kinds})")
    return files


def load_rgb(path: Path) -> Image.Image:
    """RGB image, alpha blended onto white as at inference (``to_rgb``)."""
    return to_rgb(load_image(path))


def fit_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """Upsample (bicubic, aspect kept) so that both sides are at least ``min_side``: a training crop of
    that size must fit in every image, and cropping a small image is better than dropping it."""
    width, height = image.size
    if min(width, height) < min_side:
        scale = min_side / min(width, height)
        size = (max(min_side, math.ceil(width * scale)), max(min_side, math.ceil(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


class CropSampler:
    """Random ``crop`` px crops with random horizontal flips from in-memory uint8 images.

    All randomness comes from ``generator`` (its state is checkpointed), so a run is reproducible and a
    resumed run draws the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        images: Sequence[Image.Image],
        crop: int,
        generator: torch.Generator,
        weight_by_area: bool = False,
    ) -> None:
        # (3, H, W) uint8 each: 4x smaller than float, converted per crop.
        images = [fit_min_side(im, crop) for im in images]
        self.images = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in images]
        self.crop = crop
        self.generator = generator
        areas = torch.tensor([float(im.shape[1] * im.shape[2]) for im in self.images], dtype=torch.float64)
        self.weights = areas / areas.sum() if weight_by_area else None

    def _pick(self) -> Tensor:
        if self.weights is None:
            return self.images[self._randint(len(self.images))]
        return self.images[int(torch.multinomial(self.weights, 1, generator=self.generator))]

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def batch(self, size: int) -> Tensor:
        """(size, 3, crop, crop) float32 pixels in [-1, 1] (``x / 255 * 2 - 1``, as ``pil_to_pixels``)."""
        crops = []
        for _ in range(size):
            image = self._pick()
            _, height, width = image.shape
            top, left = self._randint(height - self.crop + 1), self._randint(width - self.crop + 1)
            crop = image[:, top : top + self.crop, left : left + self.crop]
            if float(torch.rand((), generator=self.generator)) < FLIP_PROBABILITY:
                crop = crop.flip(-1)
            crops.append(crop)
        return torch.stack(crops).float() / PIXEL_MAX * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------------------
# Model, losses, optimiser
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """Losses of one training forward pass (tensors carry gradients) and the chosen codes."""

    loss: Tensor
    l1: Tensor
    l2: Tensor
    codebook: Tensor
    commitment: Tensor
    indices: Tensor
    latents: Tensor
    """(N, d) detached encoder outputs (L2-normalised when the codebook is): dead-code restart material."""
    recon: Tensor
    """The decoded batch, in [-1, 1] (carries gradients)."""
    gan_g: Tensor = field(default_factory=lambda: torch.zeros(()))
    """The generator's adversarial loss (unweighted; 0 while the adversary is off)."""
    gan_d: Tensor = field(default_factory=lambda: torch.zeros(()))
    """The discriminator's hinge loss (0 while the adversary is off)."""


def freeze_for(model: VQModel, cfg: TrainSection) -> VQModel:
    """With ``decoder_only``, stop gradients to everything that chooses the codes."""
    if cfg.decoder_only:
        for module in (model.encoder, model.quant_conv, model.quantize):
            module.requires_grad_(False)
    return model


def forward_losses(model: VQModel, pixels: Tensor, cfg: TrainSection) -> StepOutput:
    """Encoder -> quant_conv -> straight-through quantiser -> post_quant_conv -> decoder, and the losses.

    Same modules and the same code choice as ``encode``/``decode``, but differentiable (from the decoder
    only with ``decoder_only``, whose loss leaves out the codebook and commitment terms).
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.decoder_only):
        z = model.quant_conv(model.encoder(pixels))
        z_q, codebook_loss, commitment_loss, indices = model.quantize.quantize_st(z)
    recon = model.decoder(model.post_quant_conv(z_q))
    l1 = (recon - pixels).abs().mean()
    l2 = (recon - pixels).square().mean()
    loss = cfg.l1_weight * l1 + cfg.l2_weight * l2
    if not cfg.decoder_only:
        loss = loss + cfg.codebook_weight * codebook_loss + cfg.beta * commitment_loss
    latents = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    if model.config.codebook_l2_norm:
        latents = F.normalize(latents, p=2, dim=-1)
    return StepOutput(loss, l1, l2, codebook_loss, commitment_loss, indices, latents, recon)


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN (pix2pix's, as VQGAN's and LlamaGen's tokenizers use): strided 4x4 convolutions with
    BatchNorm and LeakyReLU(0.2), one real-or-drawn logit per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        nn = torch.nn
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            conv = nn.Conv2d(width, out, 4, stride, 1, bias=False)
            blocks += [conv, nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():  # DCGAN's initialisation, as pix2pix and VQGAN
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net(pixels)


class Adversary:
    """The discriminator and its optimiser: the generator's loss on a decoded batch, and one hinge-loss
    update of the discriminator on a real and a decoded batch."""

    def __init__(self, cfg: TrainSection) -> None:
        self.cfg = cfg
        self.disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).train()
        self.optimizer = torch.optim.AdamW(
            self.disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0
        )

    def active(self, step: int) -> bool:
        return step >= self.cfg.gan_start

    def generator_loss(self, recon: Tensor) -> Tensor:
        """``-mean(D(recon))``, with no gradient into the discriminator's weights."""
        self.disc.requires_grad_(False)
        try:
            return -self.disc(recon).mean()
        finally:
            self.disc.requires_grad_(True)

    def update(self, real: Tensor, fake: Tensor, lr: float) -> Tensor:
        """One step on ``0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))``; returns that loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = 0.5 * (F.relu(1.0 - self.disc(real)).mean() + F.relu(1.0 + self.disc(fake.detach())).mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"disc": self.disc.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.disc.load_state_dict(state["disc"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_optimizer(model: VQModel, cfg: TrainSection) -> torch.optim.AdamW:
    """AdamW; weight decay on conv weights only. Decaying the codebook would shrink rows that are
    re-normalised anyway, and decaying norms/biases only fights the data."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim == 4]
    rest = [p for p in trained if p.ndim != 4]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_at(step: int, cfg: TrainSection) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def train_step(
    model: VQModel,
    optimizer: torch.optim.Optimizer,
    pixels: Tensor,
    step: int,
    cfg: TrainSection,
    adversary: Adversary | None = None,
) -> tuple[StepOutput, float]:
    """One optimiser update at learning rate ``lr_at(step)`` (and, from ``gan_start``, one of the
    adversary's discriminator); returns the losses and the tokenizer's gradient norm."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = forward_losses(model, pixels, cfg)
    adversarial = adversary is not None and adversary.active(step)
    if adversarial:
        gan_g = adversary.generator_loss(out.recon)
        out.loss, out.gan_g = out.loss + cfg.gan_weight * gan_g, gan_g.detach()
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    optimizer.step()
    if adversarial:
        out.gan_d = adversary.update(pixels, out.recon, lr)
    return out, grad_norm


@torch.no_grad()
def restart_dead_codes(
    model: VQModel,
    optimizer: torch.optim.Optimizer,
    latents: Tensor,
    last_used: Tensor,
    step: int,
    after: int,
    generator: torch.Generator,
) -> int:
    """Re-seed codes unused for ``after`` steps with random rows of ``latents``; returns how many.

    Their Adam moments are zeroed so stale momentum does not drag a fresh code away, and they count as
    used now so that they get ``after`` steps to attract encoder outputs before the next restart.
    """
    dead = torch.nonzero(step - last_used >= after).flatten()
    if dead.numel() == 0:
        return 0
    weight = model.quantize.embedding.weight
    n = latents.shape[0]
    if dead.numel() <= n:  # distinct encoder outputs when the batch has enough
        rows = torch.randperm(n, generator=generator)[: dead.numel()]
    else:
        rows = torch.randint(n, (dead.numel(),), generator=generator)
    # A little noise separates codes seeded from the same latent; otherwise argmin's tie-break would
    # always pick the first of them and the copies would stay dead.
    noise = torch.randn(dead.numel(), latents.shape[1], generator=generator) * RESTART_NOISE
    weight[dead] = (latents[rows] + noise).to(weight.dtype)
    state = optimizer.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0.0
    last_used[dead] = step
    return int(dead.numel())


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def centre_crop(image: Image.Image, multiple: int, max_side: int = 0) -> Image.Image:
    """Centre crop to at most ``max_side`` px per side (0: no limit), then to a multiple of ``multiple``."""
    width, height = image.size
    limit_w, limit_h = (min(width, max_side), min(height, max_side)) if max_side else (width, height)
    new_w, new_h = limit_w // multiple * multiple, limit_h // multiple * multiple
    if new_w == 0 or new_h == 0:
        raise ValueError(f"a {width}x{height} image is smaller than {multiple} px; it cannot be encoded")
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two arrays on the 0-255 scale."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(PIXEL_MAX**2 / mse)


def luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float64 BT.601 Y on the 0-255 scale (16-235 range)."""
    return Y_OFFSET + rgb.astype(np.float64) @ np.array(Y_WEIGHTS) / PIXEL_MAX


@torch.no_grad()
def evaluate(model: VQModel, images: Sequence[Image.Image], max_side: int = 0) -> dict:
    """Hold-out reconstruction through the inference path (``encode`` -> ``decode`` -> uint8 PIL).

    Returns mean per-image PSNR (RGB and Y), codebook usage (fraction of codes the hold-out uses) and the
    perplexity (exp of the entropy) of the hold-out code histogram.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.config.codebook_size, dtype=torch.int64)
    rgb_psnr, y_psnr = [], []
    for image in images:
        crop = centre_crop(image, model.config.downsample, max_side)
        codes = model.encode(pil_to_pixels(crop)[None])
        recon = np.asarray(pixels_to_pil(model.decode(codes)[0]))
        target = np.asarray(crop)
        rgb_psnr.append(psnr(target, recon))
        y_psnr.append(psnr(luma(target), luma(recon)))
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.config.codebook_size)
    model.train(was_training)
    probs = counts[counts > 0].double() / counts.sum()
    return {
        "psnr": float(np.mean(rgb_psnr)),
        "psnr_y": float(np.mean(y_psnr)),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(probs * probs.log()).sum())),
        "images": len(images),
    }


# ---------------------------------------------------------------------------------------------------------
# Run folder: checkpoint, export, logs
# ---------------------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` written atomically (a kill never leaves a truncated checkpoint)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), overwrite=True)


def export_vq(model: VQModel, run_dir: Path) -> Path:
    """Write ``run_dir/vq`` with ``save_pretrained`` into a temporary folder, then rename it into place,
    so ``vq/`` is always either the previous complete export or the new complete one."""
    final = run_dir / VQ_DIR
    tmp = run_dir / f".{VQ_DIR}.tmp-{os.getpid()}"
    old = run_dir / f".{VQ_DIR}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_json(path: Path, data: dict) -> None:
    text = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text), overwrite=True)


class JsonLog:
    """Appends one JSON object per line to ``log.jsonl`` (flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Training run
# ---------------------------------------------------------------------------------------------------------


def _finished_metrics(run_dir: Path, steps: int) -> dict | None:
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if metrics.get("finished") and metrics.get("step") == steps else None


def _summary(result: dict) -> str:
    return (
        f"PSNR {result['psnr']:.2f} dB (Y {result['psnr_y']:.2f}), codebook usage {result['usage']:.3f}, "
        f"perplexity {result['perplexity']:.1f}"
    )


def run(recipe: VQRecipe, max_steps: int | None = None, progress: bool = True) -> dict:
    """Train (or resume, or notice a finished run) and return the metrics dict written to metrics.json.

    ``max_steps``: halt after this global step (the schedule still spans ``train.steps``) with a
    checkpoint, an export and metrics marked unfinished; rerunning continues from there.
    """
    from tqdm import tqdm

    cfg, data = recipe.train, recipe.data
    run_dir = Path(recipe.output_dir)
    vq_config = recipe.vq.to_vq_config()
    done = _finished_metrics(run_dir, cfg.steps)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    if done is not None and checkpoint_path.is_file():
        print(f"{run_dir} already finished ({cfg.steps} steps; see {run_dir / METRICS_NAME}); nothing to do")
        return done
    train_files = list_images(data.train, "data.train")
    holdout_files = list_images(data.holdout, "data.holdout")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # model initialisation
    generator = torch.Generator().manual_seed(cfg.seed)  # data order, crops, flips, restarts
    model = freeze_for(VQModel(vq_config).train(), cfg)
    optimizer = build_optimizer(model, cfg)
    adversary = Adversary(cfg) if cfg.gan_weight > 0 else None
    last_used = torch.zeros(vq_config.codebook_size, dtype=torch.int64)
    step, elapsed = 0, 0.0

    if checkpoint_path.is_file():
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
            raise ValueError(f"cannot read {checkpoint_path} ({err}); delete it to start over") from None
        if state.get("version") != CHECKPOINT_VERSION or state.get("vq_config") != vq_config.to_dict():
            raise ConfigError(
                f"{checkpoint_path} was written for another VQ architecture ({state.get('vq_config')}) than "
                f"the recipe's ({vq_config.to_dict()}); use a new output_dir or delete the old run"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        last_used = state["last_used"]
        step, elapsed = int(state["step"]), float(state["elapsed"])
        if adversary is not None and "adversary" in state:
            adversary.load_state_dict(state["adversary"])
        elif adversary is not None:
            print(f"note: {checkpoint_path} was trained without train.gan_weight; a new discriminator starts")
        # a key the checkpoint lacks was added since and had its default then
        saved = {**dataclasses.asdict(TrainSection()), **(state.get("train") or {})}
        current = dataclasses.asdict(cfg)
        changed = sorted(k for k in current if saved.get(k) != current[k])
        if changed:
            print(f"note: train.{', train.'.join(changed)} differ from the checkpoint's; using the recipe's")
        print(f"resuming {run_dir} from step {step}")
    elif cfg.init_from:
        start = VQModel.from_pretrained(cfg.init_from)
        if start.config.to_dict() != vq_config.to_dict():
            raise ConfigError(
                f"train.init_from {cfg.init_from} has another architecture ({start.config.to_dict()}) "
                f"than the recipe's vq section ({vq_config.to_dict()})"
            )
        model.load_state_dict(start.state_dict())
        print(f"starting from {cfg.init_from}")

    train_images = [load_rgb(p) for p in train_files]
    holdout_images = [load_rgb(p) for p in holdout_files]
    sampler = CropSampler(train_images, data.crop, generator, data.weight_by_area)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / RECIPE_NAME, lambda f: f.write(recipe_to_yaml(recipe).encode()), overwrite=True)
    log = JsonLog(run_dir / LOG_NAME)
    n_params = sum(p.numel() for p in model.parameters())
    if step == 0:
        log.write({"event": "start", "params": n_params, "train_images": len(train_images),
                   "holdout_images": len(holdout_images), "vq_config": vq_config.to_dict()})  # fmt: skip

    def checkpoint() -> None:
        state = {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "elapsed": elapsed,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "last_used": last_used,
            "vq_config": vq_config.to_dict(),
            "train": dataclasses.asdict(cfg),
        }
        if adversary is not None:
            state["adversary"] = adversary.state_dict()
        save_checkpoint(checkpoint_path, state)

    def evaluate_and_log() -> dict:
        started = time.perf_counter()
        result = evaluate(model, holdout_images, data.holdout_max_side)
        result["seconds"] = round(time.perf_counter() - started, 3)
        log.write({"event": "eval", "step": step, **result})
        return result

    stop_at = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    bar = tqdm(total=cfg.steps, initial=step, desc="vq", disable=not progress, dynamic_ncols=True)
    window: dict[str, float] = {}
    window_used = torch.zeros(vq_config.codebook_size, dtype=torch.bool)
    eval_result: dict | None = None
    while step < stop_at:
        started = time.perf_counter()
        pixels = sampler.batch(data.batch_size)
        out, grad_norm = train_step(model, optimizer, pixels, step, cfg, adversary)
        used = torch.unique(out.indices)
        last_used[used] = step + 1
        window_used[used] = True
        step += 1
        restarted = 0
        if cfg.dead_code_after and not cfg.decoder_only and step % cfg.dead_code_every == 0:
            restarted = restart_dead_codes(
                model, optimizer, out.latents, last_used, step, cfg.dead_code_after, generator
            )
        elapsed += time.perf_counter() - started
        for key in ("loss", "l1", "l2", "codebook", "commitment") + (("gan_g", "gan_d") if adversary else ()):
            window[key] = window.get(key, 0.0) + getattr(out, key).item()
        window["restarted"] = window.get("restarted", 0.0) + restarted
        bar.update(1)
        if step % cfg.log_every == 0 or step == stop_at:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            record = {k: (v / n if k != "restarted" else int(v)) for k, v in window.items()}
            log.write({"event": "train", "step": step, **record, "lr": lr_at(step - 1, cfg),
                       "grad_norm": grad_norm, "batch_usage": float(window_used.double().mean()),
                       "elapsed": round(elapsed, 3)})  # fmt: skip
            bar.set_postfix(loss=f"{record['loss']:.4f}", used=f"{float(window_used.double().mean()):.2f}")
            window, window_used = {}, torch.zeros_like(window_used)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            eval_result = evaluate_and_log()
            bar.write(f"step {step}: hold-out {_summary(eval_result)}")
        if cfg.save_every and step % cfg.save_every == 0 and step < stop_at:
            checkpoint()
    bar.close()

    checkpoint()
    export_vq(model, run_dir)
    eval_result = evaluate_and_log()
    finished = step >= cfg.steps
    metrics = {
        "finished": finished,
        "step": step,
        "steps": cfg.steps,
        "seconds": round(elapsed, 3),
        "seconds_per_step": round(elapsed / max(1, step), 4),
        "params": n_params,
        "holdout": eval_result,
        "vq_config": vq_config.to_dict(),
    }
    write_json(run_dir / METRICS_NAME, metrics)
    state = "finished" if finished else f"halted at step {step} of {cfg.steps} (rerun to continue)"
    print(f"{state}: hold-out {_summary(eval_result)}; tokenizer in {run_dir / VQ_DIR}")
    return metrics


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

EPILOG = """
examples:
  python -m pure.train_vq recipes/pure_tiny/vq.yaml
  python -m pure.train_vq recipes/pure_tiny/vq.yaml --set train.lr=2e-3 data.crop=96 output_dir=runs/try
  python -m pure.train_vq recipes/pure_tiny/vq.yaml --max-steps 100    # stop early; rerun to continue

Rerunning a recipe resumes from output_dir/checkpoint.pt; a finished run says so and exits 0.
The tokenizer lands in output_dir/vq (load it with pure.vq.VQModel.from_pretrained, or
python -m pure.vq --vq output_dir/vq --input img.png --output recon.png).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.train_vq",
        description="Train a LlamaGen-style VQ image tokenizer (pure.vq.VQModel) from scratch on a folder of "
        "images: L1+L2 reconstruction, VQ codebook and commitment losses, dead-code restarts, optionally a "
        "PatchGAN adversary (train.gan_weight); hold-out PSNR "
        "and codebook usage through the real encode/decode path.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="a YAML recipe (e.g. recipes/pure_tiny/vq.yaml)")
    add_set_argument(parser, "train.lr=2e-3 vq.base_channels=64")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop after global step N (the LR schedule still spans train.steps); rerun to continue",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_steps is not None and args.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1; got {args.max_steps}")
        recipe = load_vq_recipe(args.recipe, args.overrides)
        if args.print_config:
            print(recipe_to_yaml(recipe), end="")
            return 0
        run(recipe, max_steps=args.max_steps, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
