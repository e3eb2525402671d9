"""LlamaGen VQ-8 image tokenizer: pixels <-> codebook indices.

A re-implementation of LlamaGen's `VQ_8` (FoundationVision/LlamaGen, `tokenizer/tokenizer_image/vq_model.py`)
for inference only. Module attribute names reproduce LlamaGen's state-dict keys so the released
`vq_ds8_c2i.pt` loads strictly, key for key.

    encode: pixels (B, 3, H, W) in [-1, 1]  ->  codes (B, H/8, W/8) int64 in [0, codebook_size)
    decode: codes (B, h, w)                  ->  pixels (B, 3, 8h, 8w) float32 in [-1, 1]

Both run in fp32 outside autocast, as PURE does. The pixel <-> PIL arithmetic (white alpha blend,
`x/255*2-1`, truncation back to uint8) follows PURE/Chameleon exactly.

CLI: `python -m pure.vq --vq vq_ds8_c2i.pt --input img.png --output recon.png` round-trips one image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pure.imageio import atomic_write, load_image, save_image

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Length of LlamaGen's `quantize.codebook_used` buffer (a training-time usage window). Unused at inference,
# but present in every LlamaGen checkpoint, so strict loading needs it.
CODEBOOK_USAGE_WINDOW = 65536
# GroupNorm(32) in every norm layer: all feature widths must be multiples of this.
NUM_GROUPS = 32


@dataclass
class VQConfig:
    """Architecture of a LlamaGen-style VQ tokenizer. Defaults are LlamaGen's `VQ_8` (`vq_ds8_c2i.pt`).

    Encoder and decoder share `channel_mult` (LlamaGen's `encoder_ch_mult` == `decoder_ch_mult` for VQ-8);
    dropout is not a field because it has no weights and this module is inference only.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    # Registers `quantize.codebook_used`; LlamaGen's checkpoints carry it, so keep True to load them.
    codebook_show_usage: bool = True
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    # Groups of every GroupNorm (LlamaGen: 32). Fewer groups keep more of each image's mean colour through
    # the norms of a narrow VQ (2 channels per group at width 64 erase most of it). Not in `to_dict` at 32,
    # so LlamaGen-style config.json files and run records stay as they were.
    norm_groups: int = NUM_GROUPS

    def __post_init__(self) -> None:
        # JSON gives lists; keep the tuple so configs compare equal after a round trip.
        self.channel_mult = tuple(self.channel_mult)
        for name in ("codebook_size", "codebook_embed_dim", "base_channels", "z_channels", "num_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"VQConfig.{name} must be a positive integer; got {value!r}")
        if isinstance(self.norm_groups, bool) or self.norm_groups not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"VQConfig.norm_groups must divide {NUM_GROUPS}; got {self.norm_groups!r}")
        for name in ("codebook_l2_norm", "codebook_show_usage"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VQConfig.{name} must be true or false; got {getattr(self, name)!r}")
        if not self.channel_mult or any(
            isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.channel_mult
        ):
            raise ValueError(
                "VQConfig.channel_mult must be a non-empty list of positive integers; "
                f"got {self.channel_mult!r}"
            )
        widths = [self.base_channels * m for m in self.channel_mult]
        if any(w % NUM_GROUPS for w in widths):
            raise ValueError(
                f"VQConfig: every feature width base_channels * channel_mult[i] must be a multiple of "
                f"{NUM_GROUPS} (GroupNorm({NUM_GROUPS})); got widths {widths} from base_channels="
                f"{self.base_channels}, channel_mult={list(self.channel_mult)}. "
                f"Use a base_channels that is a multiple of {NUM_GROUPS}, e.g. 32 or 128."
            )

    @property
    def downsample(self) -> int:
        """Pixels per code along each side: one stride-2 conv per level but the last (8 for VQ-8)."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        data = {**dataclasses.asdict(self), "channel_mult": list(self.channel_mult)}
        if self.norm_groups == NUM_GROUPS:
            del data["norm_groups"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> VQConfig:
        """Build from a `config.json` dict; unknown keys fail with the list of valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown VQConfig keys {unknown}; valid keys are {valid}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# Building blocks (attribute names = LlamaGen's state-dict keys)
# ---------------------------------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NUM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a residual; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions, with 1x1 conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, h, w) -> (B, 1, h*w, C): one head, tokens are positions
        q, k, v = (proj(hn).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, as LlamaGen
        out = out.transpose(2, 3).reshape(b, c, h, w)  # back to (B, C, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom only (LlamaGen/taming's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResolutionLevel(nn.Module):
    """One resolution level: `res` blocks, each followed by `attn[i]` if attention is on, then a resampler.

    The resampler attribute is `downsample` (encoder) or `upsample` (decoder), matching LlamaGen's keys.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))

    def forward(self, x: Tensor) -> Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        for name in ("downsample", "upsample"):
            resample = getattr(self, name, None)
            if resample is not None:
                x = resample(x)
        return x


def _mid_block(channels: int) -> nn.ModuleList:
    # Res - Attn - Res at the lowest resolution; indices 0, 1, 2 are part of the key names.
    return nn.ModuleList(
        [ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)]
    )


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/ds, W/ds)."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        ch, mult = config.base_channels, config.channel_mult
        last = len(mult) - 1
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            # Attention only at the lowest resolution (the last level).
            block = ResolutionLevel(block_in, ch * m, config.num_res_blocks, attention=level == last)
            block_in = ch * m
            if level != last:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)
        self.mid = _mid_block(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*ds, w*ds).

    `conv_blocks[0]` is the lowest resolution (widest, with attention): levels run in reverse channel
    order, each with num_res_blocks + 1 res blocks and an upsample on all but the last entry.
    """

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        ch, mult = config.base_channels, config.channel_mult
        last = len(mult) - 1
        block_in = ch * mult[last]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _mid_block(block_in)
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            block = ResolutionLevel(
                block_in, ch * mult[level], config.num_res_blocks + 1, attention=level == last
            )
            block_in = ch * mult[level]
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Codebook `embedding` (n, d); nearest entry by L2 distance (on the unit sphere when `l2_norm`)."""

    # Rows of z per distance matrix chunk: bounds memory at chunk * n * 4 bytes (256 MiB for n = 16384).
    CHUNK = 4096

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.l2_norm = config.codebook_l2_norm
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if config.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_WINDOW))

    def codebook(self) -> Tensor:
        """(n, d) fp32 codebook, rows L2-normalised when `l2_norm`."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def nearest(self, z: Tensor) -> Tensor:
        """z (B, d, h, w) -> indices (B, h, w) int64, raster order."""
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, d)
        codebook = self.codebook()
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        # Same expansion as LlamaGen, |z|^2 + |e|^2 - 2 z.e, so near-ties break the same way.
        e_sq = codebook.square().sum(dim=1)  # (n,)
        indices = torch.empty(flat.shape[0], dtype=torch.int64, device=flat.device)
        for start in range(0, flat.shape[0], self.CHUNK):
            rows = flat[start : start + self.CHUNK]
            dist = rows.square().sum(dim=1, keepdim=True) + e_sq - 2 * rows @ codebook.T  # (rows, n)
            indices[start : start + self.CHUNK] = dist.argmin(dim=1)
        return indices.view(b, h, w)

    def quantize_st(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training-time quantisation with a straight-through estimator (LlamaGen's `forward`).

        z (B, d, h, w) -> (z_q, codebook_loss, commitment_loss, indices (B, h, w)). The indices are
        exactly those of `nearest` (what `encode` returns), so training quantises like inference. With
        `l2_norm` both losses are taken between L2-normalised latents and codebook rows, as LlamaGen does:
        `codebook_loss = mean((e - sg(z))^2)` pulls the codes towards the encoder outputs,
        `commitment_loss = mean((sg(e) - z)^2)` (unweighted: the caller applies beta) pulls the encoder
        towards its codes. `z_q` equals the (normalised) code in the forward pass and passes the decoder's
        gradient straight through to `z` in the backward pass.
        """
        indices = self.nearest(z.detach())  # argmin has no gradient; reuse the inference path
        latents = z.float()
        if self.l2_norm:
            latents = F.normalize(latents, p=2, dim=1)
        quantized = self.codebook()[indices].permute(0, 3, 1, 2)  # (B, h, w, d) -> (B, d, h, w)
        codebook_loss = (quantized - latents.detach()).square().mean()
        commitment_loss = (quantized.detach() - latents).square().mean()
        z_q = latents + (quantized - latents).detach()
        return z_q, codebook_loss, commitment_loss, indices


# ---------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer (inference only): `encode` pixels to codes, `decode` codes to pixels."""

    def __init__(self, config: VQConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VQConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = VectorQuantizer(self.config)
        self.quant_conv = nn.Conv2d(self.config.z_channels, self.config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(
            self.config.codebook_embed_dim, self.config.z_channels, kernel_size=1
        )
        if self.config.norm_groups != NUM_GROUPS:  # same parameters, coarser groups
            for module in self.modules():
                if isinstance(module, nn.GroupNorm):
                    module.num_groups = self.config.norm_groups

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def _check_fp32(self) -> None:
        if self.quant_conv.weight.dtype != torch.float32:
            raise ValueError(
                f"VQModel weights are {self.quant_conv.weight.dtype}; the tokenizer runs in float32 "
                "(as PURE does). Call model.float()."
            )

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> codes (B, H/ds, W/ds) int64 on the model's device.

        H and W must be multiples of `config.downsample` (8 for VQ-8). Always computed in fp32, also
        inside an autocast region.
        """
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(
                f"encode expects pixels of shape (B, 3, H, W); got {shape}. Add a batch dim: x[None]"
            )
        if not pixels.is_floating_point():
            raise ValueError(
                f"encode expects float pixels in [-1, 1]; got {pixels.dtype} (use pil_to_pixels)"
            )
        ds = self.config.downsample
        height, width = pixels.shape[-2:]
        if height % ds or width % ds:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of {ds} (the VQ downsample factor); "
                f"crop or resize it to a multiple of {ds} first"
            )
        self._check_fp32()
        x = pixels.to(device=self.device, dtype=torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.quant_conv(self.encoder(x))  # (B, d, H/ds, W/ds)
            return self.quantize.nearest(z)

    def codebook_lookup(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> latents (B, d, h, w) fp32 (L2-normalised rows when `codebook_l2_norm`)."""
        return (
            self.quantize.codebook()[codes].permute(0, 3, 1, 2).contiguous()
        )  # (B, h, w, d) -> (B, d, h, w)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) integer in [0, codebook_size) -> pixels (B, 3, h*ds, w*ds) float32 in [-1, 1]."""
        if not isinstance(codes, Tensor) or codes.ndim != 3:
            shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"decode expects codes of shape (B, h, w); got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"decode expects integer codes; got {codes.dtype}")
        if codes.numel() == 0:
            raise ValueError(f"decode got an empty code grid of shape {tuple(codes.shape)}")
        n = self.config.codebook_size
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= n:
            raise ValueError(
                f"codes must lie in [0, {n}) (the codebook size); got values in [{low}, {high}]. "
                "Map vocabulary image ids back to codes before decoding."
            )
        self._check_fp32()
        codes = codes.to(device=self.device, dtype=torch.int64)
        with torch.autocast(device_type=codes.device.type, enabled=False):
            quant = self.post_quant_conv(self.codebook_lookup(codes))
            return self.decoder(quant).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", config: VQConfig | None = None
    ) -> VQModel:
        """Load a tokenizer strictly (every key used, none missing); returns it in eval mode, frozen, fp32.

        `path` may be
          - a LlamaGen checkpoint (`vq_ds8_c2i.pt`: `{"model": state_dict}`; `{"ema": ...}` or a bare
            state dict also work), read with `weights_only=True`; architecture = `config` or VQ-8;
          - a folder with `config.json` + `model.safetensors` (written by `save_pretrained`);
          - a `.safetensors` file with a `config.json` beside it.
        A `config` passed here overrides the one found on disk.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"VQ tokenizer not found: {path} (expected LlamaGen's vq_ds8_c2i.pt, or a folder with "
                f"{CONFIG_NAME} + {WEIGHTS_NAME} written by VQModel.save_pretrained)"
            )
        if path.is_dir() or path.suffix == ".safetensors":
            weights = path / WEIGHTS_NAME if path.is_dir() else path
            config_file = weights.parent / CONFIG_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}; it holds {_listing(path)}")
            if config is None:
                config = _read_config(config_file)
            state_dict = _read_safetensors(weights)
        else:
            state_dict = _read_torch_checkpoint(path)
            config = config if config is not None else VQConfig()

        with torch.device("meta"):  # no allocation: the loaded tensors are assigned in place
            model = cls(config)
        _check_state_dict(model, state_dict, path)
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True, assign=True)
        return model.to(device).eval().requires_grad_(False)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `config.json` + `model.safetensors` into `folder`, each file atomically."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        weights = save(tensors, metadata={"format": "pt"})
        config = (json.dumps(self.config.to_dict(), indent=2) + "\n").encode()
        atomic_write(folder / WEIGHTS_NAME, lambda f: f.write(weights), overwrite=True)
        atomic_write(folder / CONFIG_NAME, lambda f: f.write(config), overwrite=True)


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _read_config(config_file: Path) -> VQConfig:
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} next to the weights in {config_file.parent} "
            f"(it holds {_listing(config_file.parent)}); save the tokenizer with VQModel.save_pretrained"
        )
    try:
        data = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {config_file} as JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object of VQConfig fields")
    return VQConfig.from_dict(data)


def _read_safetensors(weights: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {weights} as safetensors: {err}") from err


def _read_torch_checkpoint(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(str(err)) or type(err).__name__
        if detail.startswith("Unsupported global"):
            raise ValueError(
                f"refusing to load {path}: it pickles objects other than tensors, which weights_only=True "
                f"loading does not allow ({detail}); re-save just the state dict: torch.save({{'model': sd}})"
            ) from err
        raise ValueError(
            f"cannot read {path} as a PyTorch checkpoint ({detail}); expected LlamaGen's .pt checkpoint, "
            f"a folder with {CONFIG_NAME} + {WEIGHTS_NAME}, or a .safetensors file"
        ) from err
    except EOFError as err:
        raise ValueError(
            f"cannot read {path} as a PyTorch checkpoint: the file is empty or truncated"
        ) from err
    except (RuntimeError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {err}") from err

    if isinstance(obj, Mapping):
        for wrapper in ("model", "ema"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} does not hold a VQ state dict: expected {{'model': state_dict}} (LlamaGen), "
            f"{{'ema': state_dict}} or a bare state dict; found {_describe(obj)}"
        )
    return dict(obj)


def _unpickler_detail(message: str) -> str:
    """The informative part of torch's long weights_only error, e.g. "Unsupported global: GLOBAL x.Y ..."."""
    marker = "WeightsUnpickler error:"
    if marker not in message:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return lines[-1] if lines else ""
    rest = message.split(marker, 1)[1].strip()
    first = rest.splitlines()[0].strip() if rest else ""
    return first.split(" Please use", 1)[0].rstrip(".")  # drop torch's advice to allowlist the class


def _describe(obj: object, limit: int = 6) -> str:
    if isinstance(obj, Mapping):
        items = [f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:limit]]
        more = f", ... ({len(obj)} entries)" if len(obj) > limit else ""
        return "a dict {" + ", ".join(items) + more + "}"
    return f"a {type(obj).__name__}"


def _check_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: Path, limit: int = 5
) -> None:
    """Raise ValueError naming missing/unexpected/mis-shaped keys before any weight is copied."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    not_float = [k for k in expected if k in state_dict and not state_dict[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:limit])})")
    if mismatched:
        problems.append(f"{len(mismatched)} with the wrong shape (e.g. {'; '.join(mismatched[:limit])})")
    if not_float:
        problems.append(f"{len(not_float)} not floating point (e.g. {', '.join(not_float[:limit])})")
    if problems:
        first = ", ".join(list(state_dict)[:limit])
        raise ValueError(
            f"{source} does not match the VQ architecture {model.config}: keys " + "; ".join(problems) + ". "
            f"The file holds {len(state_dict)} tensors, starting with {first}. Pass the matching config "
            "(a .pt checkpoint implies LlamaGen VQ-8) or check that this is a LlamaGen VQ tokenizer."
        )


# ---------------------------------------------------------------------------------------------------------
# PIL <-> pixels (PURE / Chameleon arithmetic)
# ---------------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB image; transparent pixels (RGBA, LA, P with transparency, ...) are alpha-blended onto white."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0  # (H, W, 1) float64
    rgb = (1.0 - alpha) * 255.0 + alpha * rgba[:, :, :3]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")  # truncation, as PURE


def pil_to_pixels(image: Image.Image) -> Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1] as `x / 255 * 2 - 1` (alpha blended onto white first)."""
    array = np.asarray(to_rgb(image)) / 255.0 * 2.0 - 1.0  # (H, W, 3) float64, then cast once
    return torch.from_numpy(array).permute(2, 0, 1).float().contiguous()


def pixels_to_pil(pixels: Tensor) -> Image.Image:
    """(3, H, W) pixels in [-1, 1] -> RGB PIL image via clamp, `(x + 1) / 2 * 255`, truncation to uint8."""
    if not isinstance(pixels, Tensor) or pixels.ndim != 3 or pixels.shape[0] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"pixels_to_pil expects a (3, H, W) tensor; got {shape} (index the batch: x[0])")
    x = (pixels.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0
    array = (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # (H, W, 3); astype truncates
    return Image.fromarray(array, "RGB")


# ---------------------------------------------------------------------------------------------------------
# CLI: round-trip one image
# ---------------------------------------------------------------------------------------------------------


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pure.vq",
        description="Round-trip one image through the VQ image tokenizer (encode to codes, decode back) "
        "to check the tokenizer and see how much detail survives; prints the code grid shape and the "
        "PSNR of the reconstruction against the (cropped) input.",
    )
    parser.add_argument(
        "--vq",
        required=True,
        help="LlamaGen checkpoint (vq_ds8_c2i.pt) or a folder with config.json + model.safetensors",
    )
    parser.add_argument("--input", required=True, help="image to round-trip")
    parser.add_argument("--output", required=True, help="where to write the reconstruction (e.g. recon.png)")
    parser.add_argument(
        "--size", type=int, default=None, help="resize (bicubic) to SIZE x SIZE before encoding"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def _parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device (try cpu or cuda)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.size is not None and args.size < 1:
        print(f"error: --size must be a positive integer; got {args.size}", file=sys.stderr)
        return 2
    try:
        output = Path(args.output)
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
        device = _parse_device(args.device)
        image = to_rgb(load_image(args.input))
        if args.size is not None:
            image = image.resize((args.size, args.size), Image.Resampling.BICUBIC)
        model = VQModel.from_pretrained(args.vq, device=device)

        ds = model.config.downsample
        width, height = image.size
        new_w, new_h = width // ds * ds, height // ds * ds
        if new_w == 0 or new_h == 0:
            raise ValueError(f"image is {width}x{height}; it needs at least {ds} pixels per side")
        if (new_w, new_h) != (width, height):
            left, top = (width - new_w) // 2, (height - new_h) // 2
            image = image.crop((left, top, left + new_w, top + new_h))
            print(f"center-cropped {width}x{height} to {new_w}x{new_h} (a multiple of {ds})")

        codes = model.encode(pil_to_pixels(image)[None])  # (1, h, w)
        recon = pixels_to_pil(model.decode(codes)[0])
        save_image(recon, output, overwrite=args.overwrite)
    except (OSError, ValueError, torch.cuda.OutOfMemoryError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1

    _, h, w = codes.shape
    print(f"codes: {tuple(codes.shape)} ({h * w} tokens, codebook {model.config.codebook_size})")
    print(f"PSNR: {_psnr(image, recon):.2f} dB")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
