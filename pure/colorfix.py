"""Wavelet colour fix (StableSR / SeeSR, as used by PURE; spec section 5) and its AdaIN alternative, in torch.

The generated image keeps its high frequencies (detail) and takes its low frequencies (colour, illumination)
from the source, normally the LQ input bicubically upsampled to the output size:

    result = clamp(high(target) + low(source), 0, 1)

`high` and `low` come from an a-trous (stationary) wavelet decomposition: at level i = 0..levels-1 the image
is blurred with the 3x3 kernel [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16, depthwise per channel, with dilation
and replicate padding r = 2**i (1, 2, 4, 8, 16 for 5 levels); ``high += img - low``; ``img = low``.

Small images need no special case: replicate padding (unlike reflect padding) accepts a pad larger than the
image, and a tap that falls outside simply reads the nearest border pixel. A 1x1 image is its own low band.

PIL images go in and out like torchvision's ToTensor / ToPILImage, without importing torchvision: uint8 / 255
as float32, and back with ``x.mul(255).byte()``, i.e. truncation (0.999 -> 254, not 255), after the clamp.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "adain_color_fix",
    "pil_to_tensor",
    "tensor_to_pil",
    "wavelet_blur",
    "wavelet_color_fix",
    "wavelet_decompose",
]

_KERNEL = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))  # divided by 16 (exact in binary floats)
_ADAIN_EPS = 1e-5  # added to the variance, as in StableSR's calc_mean_std


def pil_to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1] (uint8 / 255, like torchvision's ToTensor)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image; got mode {image.mode}; call .convert('RGB') first")
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)


def tensor_to_pil(tensor: Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) float -> RGB PIL image.

    Values are clamped to [0, 1], then ``mul(255)`` and truncated to uint8 like torchvision's ToPILImage.
    """
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) or (1, 3, H, W) tensor; got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"expected a float tensor in [0, 1]; got {tensor.dtype}")
    array = tensor.detach().clamp(0.0, 1.0).mul(255).to(torch.uint8)  # float -> uint8 truncates
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())  # (H, W, 3) uint8 -> RGB


def wavelet_blur(image: Tensor, radius: int) -> Tensor:
    """One a-trous blur (B, C, H, W) -> (B, C, H, W): 3x3 binomial, dilation = replicate pad = radius."""
    _check_batch(image, "image")
    if radius < 1:
        raise ValueError(f"radius must be >= 1; got {radius}")
    channels = image.shape[1]
    kernel = torch.tensor(_KERNEL, dtype=image.dtype, device=image.device).div(16)
    kernel = kernel.expand(channels, 1, 3, 3).contiguous()  # depthwise: one 3x3 filter per channel
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")  # (B, C, H+2r, W+2r)
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decompose(image: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """Split (B, C, H, W) float into (sum of `levels` high bands, final low band), both (B, C, H, W).

    ``high + low == image`` up to float rounding. Computed in the input's dtype.
    """
    _check_batch(image, "image")
    if levels < 1:
        raise ValueError(f"levels must be >= 1; got {levels}")
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        blurred = wavelet_blur(low, radius=2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(
    target: Image.Image | Tensor, source: Image.Image | Tensor, levels: int = 5
) -> Image.Image | Tensor:
    """Give `target` the low frequencies (colours) of `source`, keeping its own high frequencies (detail).

    Args:
        target: the generated image: RGB PIL image, or float tensor (3, H, W) or (B, 3, H, W) in [0, 1].
        source: the reference (PURE: the bicubic-upsampled LQ input), same kind of input, same size.
        levels: wavelet levels (radii 1, 2, ..., 2**(levels-1)); PURE uses 5.

    Returns:
        Same type as `target`: an RGB PIL image (truncated to uint8), or a tensor of target's shape, dtype and
        device, clamped to [0, 1]. Half-precision tensors are processed in float32.

    Raises:
        ValueError: sizes (or batch / channel counts) differ, non-RGB PIL image, non-float tensor, bad shape.
    """
    target_batch = _as_batch(target, "target")
    source_batch = _as_batch(source, "source")
    _check_same_shape(target_batch, source_batch)
    work_dtype = torch.promote_types(target_batch.dtype, torch.float32)  # fp16 would lose the summed bands
    target_batch = target_batch.to(work_dtype)
    source_batch = source_batch.to(device=target_batch.device, dtype=work_dtype)
    target_high, _ = wavelet_decompose(target_batch, levels)
    _, source_low = wavelet_decompose(source_batch, levels)
    return _like_target((target_high + source_low).clamp(0.0, 1.0), target)


def adain_color_fix(target: Image.Image | Tensor, source: Image.Image | Tensor) -> Image.Image | Tensor:
    """Give `target` the per-channel mean and standard deviation of `source` (AdaIN; unused by PURE).

    Statistics are over H*W per image and channel, with the unbiased variance plus 1e-5 (as in StableSR), so
    the sizes may differ; batch and channel counts must match and each image needs at least 2 pixels.
    Inputs and output as in `wavelet_color_fix` (result clamped to [0, 1]).
    """
    target_batch = _as_batch(target, "target")
    source_batch = _as_batch(source, "source")
    if target_batch.shape[:2] != source_batch.shape[:2]:
        raise ValueError(
            f"target has batch x channels {tuple(target_batch.shape[:2])} but source has "
            f"{tuple(source_batch.shape[:2])}; they must match"
        )
    for batch, name in ((target_batch, "target"), (source_batch, "source")):
        if batch.shape[2] * batch.shape[3] < 2:
            raise ValueError(f"{name} needs at least 2 pixels for a standard deviation")
    work_dtype = torch.promote_types(target_batch.dtype, torch.float32)
    target_batch = target_batch.to(work_dtype)
    source_batch = source_batch.to(device=target_batch.device, dtype=work_dtype)
    target_mean, target_std = _mean_std(target_batch)
    source_mean, source_std = _mean_std(source_batch)
    result = (target_batch - target_mean) / target_std * source_std + source_mean
    return _like_target(result.clamp(0.0, 1.0), target)


def _mean_std(batch: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> per-channel mean and std, each (B, C, 1, 1)."""
    flat = batch.flatten(2)  # (B, C, H*W)
    std = (flat.var(dim=2, unbiased=True) + _ADAIN_EPS).sqrt()
    return flat.mean(dim=2)[..., None, None], std[..., None, None]


def _check_batch(image: Tensor, name: str) -> None:
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) tensor; got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1]; got {image.dtype} (divide by 255 first)")


def _as_batch(image: Image.Image | Tensor, name: str) -> Tensor:
    """PIL RGB -> (1, 3, H, W) float32; (3, H, W) -> (1, 3, H, W); (B, 3, H, W) as is."""
    if isinstance(image, Image.Image):
        return pil_to_tensor(image)[None]
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a PIL image or a torch tensor; got {type(image).__name__}")
    batch = image[None] if image.ndim == 3 else image
    _check_batch(batch, name)
    if batch.shape[1] != 3:
        raise ValueError(f"{name} must have 3 channels (RGB); got shape {tuple(image.shape)}")
    return batch


def _check_same_shape(target: Tensor, source: Tensor) -> None:
    (tb, _, th, tw), (sb, _, sh, sw) = target.shape, source.shape
    if (th, tw) != (sh, sw):
        raise ValueError(
            f"target is {tw}x{th} px but source is {sw}x{sh} px; resize the source to the target size first "
            "(PURE uses the bicubic-upsampled LQ input)"
        )
    if tb != sb:
        raise ValueError(f"target has a batch of {tb} but source has {sb}; they must match")


def _like_target(result: Tensor, target: Image.Image | Tensor) -> Image.Image | Tensor:
    """(B, 3, H, W) in [0, 1] -> the type, shape and dtype of `target`."""
    if isinstance(target, Image.Image):
        return tensor_to_pil(result)
    result = result.to(target.dtype)
    return result[0] if target.ndim == 3 else result
