"""Tests for pure.vq: LlamaGen VQ-8 layout, strict loading, encode/decode, PIL arithmetic, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pure.vq import (
    AttnBlock,
    Downsample,
    Upsample,
    VQConfig,
    VQModel,
    main,
    pil_to_pixels,
    pixels_to_pil,
)

TINY = VQConfig(
    codebook_size=64,
    codebook_embed_dim=8,
    base_channels=32,
    channel_mult=(1, 2, 2, 4),
    z_channels=32,
    num_res_blocks=2,
)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model() -> VQModel:
    torch.manual_seed(0)
    return VQModel(TINY).eval().requires_grad_(False)


def _pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


# ---------------------------------------------------------------------------------------------- layout


def test_default_config_is_llamagen_vq8() -> None:
    config = VQConfig()
    assert config.downsample == 8
    assert (config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm) == (16384, 8, True)
    assert (config.base_channels, config.channel_mult, config.z_channels) == (128, (1, 2, 2, 4), 256)


def test_default_state_dict_matches_llamagen_vq8_keys_and_shapes() -> None:
    with torch.device("meta"):  # 70M parameters: shapes only, no allocation
        model = VQModel()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Derived from LlamaGen's vq_model.py with ch=128, ch_mult=[1,2,2,4], num_res_blocks=2:
    # encoder 126 (conv_in 2, levels 18+20+18+38, mid 26, norm_out+conv_out 4),
    # decoder 168 (conv_in 2, mid 26, levels 56+28+26+26, norm_out+conv_out 4), quantize 2, quant convs 4.
    assert len(shapes) == 300
    expected = {
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "quant_conv.weight": (8, 256, 1, 1),
        "quant_conv.bias": (8,),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.0.res.0.norm1.weight": (128,),
        "encoder.conv_blocks.0.res.1.conv2.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.conv_blocks.1.res.0.conv1.weight": (256, 128, 3, 3),
        "encoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.2.downsample.conv.bias": (256,),
        "encoder.conv_blocks.3.res.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.conv_blocks.3.attn.0.q.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.3.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.3.attn.1.norm.bias": (512,),
        "encoder.mid.0.conv1.weight": (512, 512, 3, 3),
        "encoder.mid.1.k.weight": (512, 512, 1, 1),
        "encoder.mid.2.norm2.weight": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.mid.1.v.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.res.2.conv2.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.0.attn.2.q.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.conv1.weight": (256, 512, 3, 3),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.2.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_blocks.3.res.2.conv1.weight": (128, 128, 3, 3),
        "decoder.norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    # Attention only at the lowest resolution, no resampler after the last level,
    # no shortcut when the widths match.
    absent = [
        "encoder.conv_blocks.0.attn.0.q.weight",
        "encoder.conv_blocks.3.downsample.conv.weight",
        "encoder.conv_blocks.0.res.0.nin_shortcut.weight",
        "decoder.conv_blocks.1.attn.0.q.weight",
        "decoder.conv_blocks.3.upsample.conv.weight",
        "decoder.conv_blocks.0.res.3.conv1.weight",
    ]
    for key in absent:
        assert key not in shapes, key


def test_config_validation_says_the_fix() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        VQConfig(base_channels=48)
    with pytest.raises(ValueError, match="channel_mult"):
        VQConfig(channel_mult=())
    with pytest.raises(ValueError, match="codebook_size"):
        VQConfig(codebook_size=0)
    with pytest.raises(ValueError, match="valid keys"):
        VQConfig.from_dict({"base_channels": 32, "ch": 3})
    assert VQConfig.from_dict(TINY.to_dict()) == TINY  # JSON lists come back as tuples


def test_downsample_pads_right_and_bottom_only() -> None:
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.fill_(1.0)
        down.conv.bias.zero_()
    out = down(torch.ones(1, 1, 4, 4))
    # (0,1,0,1) padding: the top-left window is all inside (9 ones), the bottom-right one touches padding.
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_upsample_is_nearest_then_conv() -> None:
    up = Upsample(1)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity conv
        up.conv.bias.zero_()
    x = torch.arange(4.0).view(1, 1, 2, 2)
    expected = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), expected)


def test_attention_matches_single_head_formula() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 3, 5)
    hn = block.norm(x)
    q, k, v = (proj(hn).flatten(2) for proj in (block.q, block.k, block.v))  # (B, C, h*w)
    weights = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=-1)  # (B, hw_q, hw_k)
    out = (v @ weights.transpose(1, 2)).view(2, 32, 3, 5)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("wrapper", ["model", "ema", None])
def test_llamagen_checkpoint_loads_strictly(tmp_path: Path, tiny_model: VQModel, wrapper: str | None) -> None:
    state_dict = tiny_model.state_dict()
    path = tmp_path / "vq_tiny.pt"
    torch.save(state_dict if wrapper is None else {wrapper: state_dict}, path)
    loaded = VQModel.from_pretrained(path, config=TINY)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for key, value in state_dict.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    pixels = _pixels(1, 16, 24)
    assert torch.equal(loaded.encode(pixels), tiny_model.encode(pixels))


def test_pt_checkpoint_implies_vq8_config(tmp_path: Path, tiny_model: VQModel) -> None:
    path = tmp_path / "vq_tiny.pt"
    torch.save({"model": tiny_model.state_dict()}, path)
    with pytest.raises(ValueError, match="wrong shape") as info:
        VQModel.from_pretrained(path)  # default VQ-8 config, tiny weights
    assert "encoder.conv_in.weight (32, 3, 3, 3) vs (128, 3, 3, 3)" in str(info.value)


def test_checkpoint_with_missing_key_fails_clearly(tmp_path: Path, tiny_model: VQModel) -> None:
    state_dict = dict(tiny_model.state_dict())
    del state_dict["quantize.codebook_used"]
    path = tmp_path / "missing.pt"
    torch.save({"model": state_dict}, path)
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. quantize\.codebook_used\)"):
        VQModel.from_pretrained(path, config=TINY)


def test_checkpoint_with_extra_key_fails_clearly(tmp_path: Path, tiny_model: VQModel) -> None:
    state_dict = dict(tiny_model.state_dict())
    state_dict["decoder.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save({"model": state_dict}, path)
    with pytest.raises(ValueError, match=r"1 unexpected \(e\.g\. decoder\.extra\.weight\)") as info:
        VQModel.from_pretrained(path, config=TINY)
    assert "holds" in str(info.value)  # says what the file looks like


class NotATensor:
    """A custom class: weights_only unpickling must refuse it."""


def test_pickle_with_objects_is_refused(tmp_path: Path, tiny_model: VQModel) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {**tiny_model.state_dict(), "payload": NotATensor()}}, path)
    with pytest.raises(ValueError, match=r"objects other than tensors.*weights_only=True"):
        VQModel.from_pretrained(path, config=TINY)


def test_checkpoint_without_state_dict_is_described(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"step": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match=r"does not hold a VQ state dict.*'step': int"):
        VQModel.from_pretrained(path, config=TINY)


def test_missing_paths_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        VQModel.from_pretrained(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        VQModel.from_pretrained(tmp_path / "empty")


def test_safetensors_round_trip(tmp_path: Path, tiny_model: VQModel) -> None:
    folder = tmp_path / "vq"
    tiny_model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    assert VQConfig.from_dict(json.loads((folder / "config.json").read_text())) == TINY

    pixels = _pixels(2, 16, 16)
    codes = tiny_model.encode(pixels)
    expected = tiny_model.decode(codes)
    for path in (folder, folder / "model.safetensors"):
        loaded = VQModel.from_pretrained(path)
        assert loaded.config == TINY
        assert torch.equal(loaded.encode(pixels), codes)
        assert torch.equal(loaded.decode(codes), expected)

    tiny_model.save_pretrained(folder)  # overwriting an existing folder works
    assert VQModel.from_pretrained(folder).config == TINY


# ------------------------------------------------------------------------------------- encode / decode


def test_encode_decode_shapes_dtypes_and_ranges(tiny_model: VQModel) -> None:
    codes = tiny_model.encode(_pixels(2, 24, 40))
    assert codes.shape == (2, 3, 5)
    assert codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.codebook_size
    pixels = tiny_model.decode(codes)
    assert pixels.shape == (2, 3, 24, 40)
    assert pixels.dtype == torch.float32
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0


def test_encode_rejects_sizes_not_multiple_of_downsample(tiny_model: VQModel) -> None:
    with pytest.raises(ValueError, match="not a multiple of 8"):
        tiny_model.encode(_pixels(1, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model.encode(_pixels(1, 16, 16)[0])


def test_decode_rejects_out_of_range_codes(tiny_model: VQModel) -> None:
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny_model.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny_model.decode(torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="integer"):
        tiny_model.decode(torch.zeros(1, 2, 2))


def test_codebook_lookup_uses_l2_normalised_rows(tiny_model: VQModel) -> None:
    codes = torch.arange(TINY.codebook_size).view(1, 8, 8)
    latents = tiny_model.codebook_lookup(codes)  # (1, 8, 8, 8)
    torch.testing.assert_close(latents.norm(dim=1), torch.ones(1, 8, 8))
    weight = tiny_model.quantize.embedding.weight
    torch.testing.assert_close(latents[0, :, 0, 1], weight[1] / weight[1].norm())  # raster order


@pytest.mark.parametrize("l2_norm", [True, False])
def test_quantizer_is_idempotent_on_codebook_entries(l2_norm: bool) -> None:
    # The code -> latent -> code round trip is exact: this is where encode and decode must agree on
    # normalisation and on the (B, d, h, w) <-> (B, h, w) layout. Rows get different norms on purpose.
    torch.manual_seed(0)
    model = VQModel(VQConfig(**{**TINY.to_dict(), "codebook_l2_norm": l2_norm}))
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(torch.rand(TINY.codebook_size, 1) * 3 + 0.5)
    codes = torch.randint(0, TINY.codebook_size, (2, 3, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.quantize.nearest(model.codebook_lookup(codes)), codes)


def test_quantizer_picks_max_cosine_with_l2_norm(tiny_model: VQModel) -> None:
    z = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(2)) * 5  # scale must not matter
    codes = tiny_model.quantize.nearest(z)
    weight = tiny_model.quantize.embedding.weight
    cosine = torch.einsum(
        "bdhw,nd->bhwn", z / z.norm(dim=1, keepdim=True), weight / weight.norm(dim=1, keepdim=True)
    )
    assert torch.equal(codes, cosine.argmax(dim=-1))


def test_batch_equals_singles(tiny_model: VQModel) -> None:
    pixels = _pixels(2, 16, 24, seed=3)
    codes = tiny_model.encode(pixels)
    singles = torch.cat([tiny_model.encode(pixels[i : i + 1]) for i in range(2)])
    assert torch.equal(codes, singles)
    decoded = tiny_model.decode(codes)
    decoded_singles = torch.cat([tiny_model.decode(codes[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(decoded, decoded_singles, atol=1e-5, rtol=1e-5)


def test_encode_runs_in_fp32_inside_autocast(tiny_model: VQModel) -> None:
    seen: list[torch.dtype] = []
    handle = tiny_model.encoder.conv_out.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        pixels = _pixels(1, 16, 16, seed=4)
        reference = tiny_model.encode(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = tiny_model.encode(pixels.bfloat16())
            decoded = tiny_model.decode(inside)
    finally:
        handle.remove()
    assert seen == [torch.float32, torch.float32]  # a conv under active bf16 autocast would output bf16
    assert torch.equal(inside, reference)
    assert decoded.dtype == torch.float32


# -------------------------------------------------------------------------------------- PIL <-> pixels


def test_pil_to_pixels_rgb_arithmetic_is_exact() -> None:
    values = np.array([[[0, 1, 127], [128, 254, 255]]], dtype=np.uint8)  # (1, 2, 3)
    pixels = pil_to_pixels(Image.fromarray(values, "RGB"))
    assert pixels.shape == (3, 1, 2) and pixels.dtype == torch.float32
    expected = torch.from_numpy(values / 255.0 * 2.0 - 1.0).float().permute(2, 0, 1)
    assert torch.equal(pixels, expected)
    assert pixels[0, 0, 0] == -1.0 and pixels[2, 0, 1] == 1.0


def test_pil_to_pixels_blends_transparency_onto_white() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    rgba[0, 1] = (0, 0, 0, 128)  # half black: 255 * (1 - 128/255) = 127 after truncation
    rgba[1, :] = (200, 100, 50, 255)  # opaque: unchanged
    pixels = pil_to_pixels(Image.fromarray(rgba, "RGBA"))
    assert torch.equal(pixels[:, 0, 0], torch.ones(3))
    assert torch.equal(pixels[:, 0, 1], torch.full((3,), np.float32(127 / 255 * 2 - 1)))
    assert torch.equal(
        pixels[:, 1, 0], (torch.tensor([200.0, 100, 50], dtype=torch.float64) / 255 * 2 - 1).float()
    )

    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert pil_to_pixels(la)[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert pil_to_pixels(la)[:, 0, 1].tolist() == [-1.0, -1.0, -1.0]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 is transparent
    assert pil_to_pixels(palette)[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert pil_to_pixels(palette)[:, 0, 1].tolist() == [1.0, -1.0, -1.0]

    gray = pil_to_pixels(Image.new("L", (1, 1), 51))
    assert gray[:, 0, 0].tolist() == [np.float32(51 / 255 * 2 - 1)] * 3


def test_pixels_to_pil_truncates_and_clamps() -> None:
    near_128 = 127.99 / 127.5 - 1.0  # (x + 1) / 2 * 255 = 127.99
    pixels = torch.tensor([near_128, -5.0, 5.0, 0.0]).view(1, 1, 4).expand(3, 1, 4)
    array = np.asarray(pixels_to_pil(pixels))
    assert array.dtype == np.uint8 and array.shape == (1, 4, 3)
    assert array[0, :, 0].tolist() == [127, 0, 255, 127]  # rounding would give 128 and 128


def test_pil_pixels_round_trip_is_lossless() -> None:
    values = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    back = np.asarray(pixels_to_pil(pil_to_pixels(Image.fromarray(values, "RGB"))))
    # Truncation can lose one level where the float round trip lands just below an integer.
    assert np.abs(back.astype(int) - values).max() <= 1
    assert (back == values).mean() > 0.5


# ------------------------------------------------------------------------------------------------- CLI


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pure.vq", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_round_trips_an_image(tmp_path: Path, tiny_model: VQModel) -> None:
    tiny_model.save_pretrained(tmp_path / "vq")
    rgb = np.random.default_rng(0).integers(0, 256, size=(28, 36, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "in.png")
    output = tmp_path / "recon.png"
    result = _run_cli(
        "--vq", str(tmp_path / "vq"), "--input", str(tmp_path / "in.png"), "--output", str(output)
    )
    assert result.returncode == 0, result.stderr
    assert "center-cropped 36x28 to 32x24" in result.stdout
    assert "(1, 3, 4)" in result.stdout and "PSNR" in result.stdout
    with Image.open(output) as recon:
        assert recon.size == (32, 24) and recon.mode == "RGB"


def test_cli_missing_input_prints_one_error_line(tmp_path: Path, tiny_model: VQModel) -> None:
    tiny_model.save_pretrained(tmp_path / "vq")
    result = _run_cli(
        "--vq",
        str(tmp_path / "vq"),
        "--input",
        str(tmp_path / "nope.png"),
        "--output",
        str(tmp_path / "o.png"),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert not (tmp_path / "o.png").exists()


def test_cli_errors_in_process(tmp_path: Path, tiny_model: VQModel, capsys: pytest.CaptureFixture) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert (
        main(["--vq", str(bad), "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "o.png")])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1

    (tmp_path / "o.png").write_bytes(b"keep me")
    tiny_model.save_pretrained(tmp_path / "vq")
    args = [
        "--vq",
        str(tmp_path / "vq"),
        "--input",
        str(tmp_path / "in.png"),
        "--output",
        str(tmp_path / "o.png"),
    ]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "o.png").read_bytes() == b"keep me"
    assert main([*args, "--overwrite", "--size", "8"]) == 0
    with Image.open(tmp_path / "o.png") as recon:
        assert recon.size == (8, 8)


# ------------------------------------------------------------------------------------------ real weights


@pytest.mark.weights
def test_real_vq8_reconstructs_an_image() -> None:
    path = os.environ.get("PURE_VQ_CKPT")
    if not path or not Path(path).is_file():
        pytest.skip("set PURE_VQ_CKPT to LlamaGen's vq_ds8_c2i.pt to run")
    skimage_data = pytest.importorskip("skimage.data")
    model = VQModel.from_pretrained(path)
    image = Image.fromarray(skimage_data.astronaut()).resize((256, 256), Image.Resampling.BICUBIC)
    pixels = pil_to_pixels(image)[None]
    codes = model.encode(pixels)
    assert codes.shape == (1, 32, 32)
    recon = model.decode(codes)
    mse = float(((recon - pixels) ** 2).mean()) / 4  # in [0, 1] units
    # Conservative bound (not measured here: no weights offline); a wrong layout gives noise (< 12 dB).
    assert 10 * np.log10(1 / mse) > 20
