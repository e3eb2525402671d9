"""``python -m pure.data.bench``: throughput of the data pipeline.

Measures, at ``--size`` px (512, PURE's HQ crop):

- **pairs** on the CPU, one core (torch and OpenCV limited to one thread): the whole per-pair step of
  ``pure.data.pairs`` (random crop, degradation, parameter record with label, PNG encoding of both
  images), and the degradation alone. Pairs per second per core; with ``--workers N`` the pairs step
  scales about linearly over N cores, since each worker takes whole images.
- **pairs on the GPU**, when CUDA is available (or ``--device cuda``): `degrade` on batches of
  ``--gpu-batch`` HQ images on the device (the JPEG codec runs on the CPU).
- **pre-tokenisation**: `encode_records` (read both PNGs, bicubic LQ upsampling, VQ encoding of LQ and HQ,
  sequence building) and `write_shard`, records per second, on ``--device``. The VQ is said in the
  output: ``--vq tiny`` (default; the random test VQ, fast, *not* representative), ``--vq vq8-random``
  (LlamaGen VQ-8's architecture with random weights: the real cost without the weights), or a path to a
  real VQ checkpoint; the tokenizer is a byte-level test tokenizer with PURE's special tokens.

Source images are scikit-image's bundled photographs when it is installed, else synthetic ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pure.data.degradations import DegradationConfig, degrade
from pure.data.pairs import PairSettings, make_pair, png_bytes
from pure.data.pretokenize import Tokenizers, encode_records
from pure.data.records import make_record
from pure.data.shards import write_shard
from pure.make_random_checkpoint import TINY_VQ
from pure.sequence import SequenceFormat
from pure.tokenizer import PureTokenizer, build_byte_tokenizer
from pure.vocab import PureVocab
from pure.vq import VQConfig, VQModel

_SKIMAGE_NAMES = ("astronaut", "retina", "hubble_deep_field", "immunohistochemistry", "coffee", "rocket")
CAPTION = (
    "The image shows an astronaut in a white space suit, smiling, holding a helmet in front of the "
    "American flag, with a space shuttle model in the background."
)


def source_images(size: int) -> list[Image.Image]:
    """RGB images at least ``size + size // 4`` px on each side (upscaled when needed)."""
    side = size + size // 4
    images = []
    try:
        import skimage.data

        for name in _SKIMAGE_NAMES:
            array = getattr(skimage.data, name)()
            image = Image.fromarray(array).convert("RGB")
            scale = max(1.0, side / min(image.size))
            images.append(
                image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            )
    except ImportError:
        g = np.random.default_rng(0)
        for _ in range(4):
            yy, xx = np.mgrid[0:side, 0:side] / side
            base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + g.normal(0, 20, (side, side, 3))
            images.append(Image.fromarray(base.clip(0, 255).astype(np.uint8)))
    return images


def _single_thread() -> tuple[int, int | None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import cv2

        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
    except ImportError:
        cv_threads = None
    return threads, cv_threads


def _restore_threads(threads: int, cv_threads: int | None) -> None:
    torch.set_num_threads(threads)
    if cv_threads is not None:
        import cv2

        cv2.setNumThreads(cv_threads)


def bench_pairs_cpu(images: list[Image.Image], size: int, n: int, preset: str) -> dict:
    """Pairs per second on one core: the whole pairs step, and the degradation alone."""
    config = DegradationConfig.from_yaml(preset)
    settings = PairSettings(preset=preset, crop=size)
    saved = _single_thread()
    try:
        make_pair(images[0], config, settings, "warmup", 0)
        start = time.perf_counter()
        for i in range(n):
            hq, lq, _ = make_pair(images[i % len(images)], config, settings, f"bench{i}", i)
            png_bytes(hq), png_bytes(lq)
        step = time.perf_counter() - start
        crops = [
            torch.from_numpy(np.asarray(images[i % len(images)])[:size, :size].copy()).permute(2, 0, 1)
            / 255.0
            for i in range(n)
        ]
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for crop in crops:
            degrade(crop[None], config, generator)
        degradation = time.perf_counter() - start
    finally:
        _restore_threads(*saved)
    return {
        "pairs_per_s_per_core": n / step,
        "degrade_only_per_s_per_core": n / degradation,
        "ms_per_pair": 1000 * step / n,
    }


def bench_pairs_gpu(
    images: list[Image.Image], size: int, n: int, batch: int, preset: str, device: str
) -> dict:
    """`degrade` on batches of HQ images on a GPU."""
    config = DegradationConfig.from_yaml(preset)
    crops = [
        torch.from_numpy(np.asarray(images[i % len(images)])[:size, :size].copy()).permute(2, 0, 1) / 255.0
        for i in range(batch)
    ]
    hq = torch.stack(crops).to(device)  # (B, 3, size, size)
    generator = torch.Generator().manual_seed(0)
    degrade(hq, config, generator)  # warm-up (kernels, cuDNN)
    torch.cuda.synchronize(device)
    batches = max(1, n // batch)
    start = time.perf_counter()
    for _ in range(batches):
        degrade(hq, config, generator)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {
        "pairs_per_s": batches * batch / elapsed,
        "batch": batch,
        "device": torch.cuda.get_device_name(device),
    }


def _tokenizers(vq: str, device: str) -> tuple[Tokenizers, str]:
    if vq in ("tiny", "vq8-random"):
        config = TINY_VQ if vq == "tiny" else VQConfig()
        torch.manual_seed(0)
        model = VQModel(config).to(device).eval().requires_grad_(False)
        text = build_byte_tokenizer(config.codebook_size)
        tokenizer = PureTokenizer(text, PureVocab.from_names(text.get_vocab(with_added_tokens=True)))
        what = (
            "tiny random VQ (codebook 64, 32 base channels; not representative)"
            if vq == "tiny"
            else "LlamaGen VQ-8 architecture (codebook 16384), random weights"
        )
        return Tokenizers(tokenizer, model, SequenceFormat(tokenizer), {}), what
    folder = Path(tempfile.mkdtemp(prefix="pure-bench-tok-"))
    text = build_byte_tokenizer(VQModel.from_pretrained(vq).config.codebook_size)
    text.save(str(folder / "tokenizer.json"))
    return Tokenizers.load(folder, vq, device), f"{vq}"


def bench_pretokenize(
    images: list[Image.Image], size: int, n: int, vq: str, device: str, batch_size: int, preset: str
) -> dict:
    """Records per second through `encode_records` and `write_shard` (pairs made first, not timed)."""
    config = DegradationConfig.from_yaml(preset)
    settings = PairSettings(preset=preset, crop=size)
    tok, what = _tokenizers(vq, device)
    with tempfile.TemporaryDirectory(prefix="pure-bench-") as tmp:
        base = Path(tmp)
        records = []
        for i in range(n):
            hq, lq, meta = make_pair(images[i % len(images)], config, settings, f"bench{i}", i)
            (base / f"hq{i}.png").write_bytes(png_bytes(hq))
            (base / f"lq{i}.png").write_bytes(png_bytes(lq))
            records.append(make_record(f"bench/{i}", f"lq{i}.png", f"hq{i}.png", meta["label"], CAPTION))
        warm, _ = encode_records(records[:batch_size], base, tok, size, batch_size)  # warm-up, also
        write_shard(warm[:1], base / "warmup")  # the first write imports datasets
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        examples, failures = encode_records(records, base, tok, size, batch_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        encode = time.perf_counter() - start
        start = time.perf_counter()
        write_shard(examples, base / "shard")
        write = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"benchmark records failed: {failures[:2]}")
    return {
        "records_per_s": n / (encode + write),
        "encode_records_per_s": n / encode,
        "write_shard_records_per_s": n / write,
        "tokens_per_record": int(examples[0].input_ids.numel()),
        "vq": what,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pure.data.bench",
        description="Benchmark the data pipeline: LQ/HQ pairs per second per core (CPU), batched on the GPU "
        "when present, and pre-tokenisation records per second.",
    )
    parser.add_argument("--size", type=int, default=512, help="HQ crop size in px (default 512)")
    parser.add_argument("--pairs", type=int, default=24, help="pairs to time on the CPU (default 24)")
    parser.add_argument("--records", type=int, default=16, help="records to pre-tokenise (default 16)")
    parser.add_argument("--preset", default="realesrgan", help="degradation preset (default realesrgan)")
    parser.add_argument(
        "--vq",
        default="tiny",
        help="tiny (default), vq8-random, or a VQ checkpoint path for pre-tokenisation",
    )
    parser.add_argument("--device", default=None, help="device for pre-tokenisation (default cuda if any)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per VQ batch (default 8)")
    parser.add_argument(
        "--gpu-batch", type=int, default=16, help="HQ images per GPU degrade batch (default 16)"
    )
    parser.add_argument(
        "--skip", nargs="*", default=(), choices=("cpu", "gpu", "pretokenize"), help="parts to skip"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.size % 32 or args.size < 32:
        print(f"error: --size must be a multiple of 32; got {args.size}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    images = source_images(args.size)
    results: dict = {"size": args.size, "preset": args.preset}
    if "cpu" not in args.skip:
        r = results["pairs_cpu"] = bench_pairs_cpu(images, args.size, args.pairs, args.preset)
        print(
            f"pairs, CPU, 1 core, {args.size} px: {r['pairs_per_s_per_core']:.2f} pairs/s/core "
            f"({r['ms_per_pair']:.0f} ms per pair incl. crop, label, PNG encoding); degradation alone "
            f"{r['degrade_only_per_s_per_core']:.2f}/s/core"
        )
    if "gpu" not in args.skip and torch.cuda.is_available():
        r = results["pairs_gpu"] = bench_pairs_gpu(
            images, args.size, max(args.pairs, 4 * args.gpu_batch), args.gpu_batch, args.preset, "cuda"
        )
        print(f"pairs, GPU ({r['device']}), batch {r['batch']}: {r['pairs_per_s']:.1f} pairs/s")
    elif "gpu" not in args.skip:
        print("pairs, GPU: no CUDA device, skipped")
    if "pretokenize" not in args.skip:
        r = results["pretokenize"] = bench_pretokenize(
            images, args.size, args.records, args.vq, device, args.batch_size, args.preset
        )
        print(
            f"pre-tokenisation, {device} ({r['torch_threads']} torch threads), VQ: {r['vq']}: "
            f"{r['records_per_s']:.2f} records/s (encode {r['encode_records_per_s']:.2f}/s, shard write "
            f"{r['write_shard_records_per_s']:.0f}/s; {r['tokens_per_record']} tokens per record)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
