"""Can the degradation level be read from what the model is shown? A linear probe, before blaming the model.

    python recipes/pure_tiny/perceive_probe.py --records data/pure_tiny_v2/records_scenes.jsonl \
        --vq examples/pure-tiny-v2/vq

PURE-tiny's Perceive answers ("Small blur, medium noise.") sit at chance in every v2 stage. The model sees
the LQ only as VQ codes of its bicubic upsampling; if those codes no longer carry the blur and noise levels,
no training of the language model can recover them. This fits one multinomial logistic regression per label
(blur level, noise level) on simple image statistics (log mean absolute high-pass, gradient magnitude and
contrast, per luma and chroma; 12 numbers), computed on

- ``lq``: the bicubic-upsampled LQ (what the tokenizer is given);
- ``codes``: its VQ round trip (what the codes keep of it: all the model can know);

and on the bag of the LQ's codes itself (``bag``: 1024 code frequencies, L2-regularised). Records of one
source image stay on one side of the split. Prints held-out exact-match beside chance (uniform) and the
majority class. A probe near the majority class on ``codes`` while well above it on ``lq`` says the
tokenizer, not the model, loses the level.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from pure.eval.holdout import Y_WEIGHTS, degradation_levels
from pure.vq import VQModel, pil_to_pixels, pixels_to_pil

LUMA = torch.tensor(Y_WEIGHTS) / sum(Y_WEIGHTS)  # BT.601: 0.299 R + 0.587 G + 0.114 B


def statistics(pixels: torch.Tensor) -> torch.Tensor:
    """12 numbers of a (3, H, W) image in [-1, 1]: for luma and the two chroma differences, the log mean
    absolute 3x3 high-pass, log mean gradient magnitude, log standard deviation and log mean absolute 2x2
    high-pass (the finest scale)."""
    y = (LUMA[:, None, None] * pixels).sum(0)
    channels = torch.stack([y, pixels[0] - y, pixels[2] - y])[:, None]  # (3, 1, H, W)
    features = []
    for c in channels:
        c = c[None]
        high = c - F.avg_pool2d(F.pad(c, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        gx, gy = c[..., :, 1:] - c[..., :, :-1], c[..., 1:, :] - c[..., :-1, :]
        grad = (gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).sqrt()
        fine = c[..., ::2, ::2] - c[..., 1::2, 1::2]
        features += [high.abs().mean(), grad.mean(), c.std(), fine.abs().mean()]
    return torch.stack(features).clamp_min(1e-6).log()


def fit_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int, l2: float) -> torch.Tensor:
    """Multinomial logistic regression on standardised features (LBFGS); returns held-out predictions."""
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z[train] @ w + b, y[train]) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (z[~train] @ w + b).argmax(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", required=True, help="records .jsonl (pure.data.records)")
    p.add_argument("--vq", required=True, help="the VQ tokenizer folder")
    p.add_argument("--limit", type=int, default=2000, help="records to use (default 2000)")
    p.add_argument("--size", type=int, default=128, help="HQ side: the LQ is upsampled to it (default 128)")
    args = p.parse_args()

    vq = VQModel.from_pretrained(args.vq)
    root = Path(args.records).parent
    records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    records = records[: args.limit]
    feats: dict[str, list[torch.Tensor]] = {"lq": [], "codes": [], "bag": []}
    labels: dict[str, list[str]] = {"blur": [], "noise": []}
    groups = []
    with torch.no_grad():
        for r in records:
            lq = Image.open(root / r["image"][0]).convert("RGB").resize((args.size, args.size), Image.BICUBIC)
            pixels = pil_to_pixels(lq)
            codes = vq.encode(pixels[None])
            round_trip = pil_to_pixels(pixels_to_pil(vq.decode(codes)[0]))
            feats["lq"].append(statistics(pixels))
            feats["codes"].append(statistics(round_trip))
            feats["bag"].append(torch.bincount(codes.flatten(), minlength=vq.config.codebook_size).float())
            blur, noise = degradation_levels(r["degradation"]["label"])
            labels["blur"].append(blur)
            labels["noise"].append(noise)
            groups.append(r["id"].rsplit("_", 1)[0])
    names = sorted(set(groups))
    random.Random(0).shuffle(names)
    held = set(names[: len(names) // 4])
    train = torch.tensor([g not in held for g in groups])
    print(f"{len(records)} records, {int((~train).sum())} held out (by source image)")
    for label, values in labels.items():
        classes = sorted(set(values))
        y = torch.tensor([classes.index(v) for v in values])
        counts = Counter(values[i] for i in range(len(values)) if not train[i])
        majority = max(counts.values()) / sum(counts.values())
        line = f"{label:5s} ({'/'.join(classes)}): chance {1 / len(classes):.2f}, majority {majority:.2f}"
        for name, x in feats.items():
            x = torch.stack(x)
            if name == "bag":
                x = x / x.sum(1, keepdim=True)
            predicted = fit_probe(x, y, train, len(classes), l2=1e-2 if name == "bag" else 1e-4)
            line += f", {name} {(predicted == y[~train]).float().mean():.2f}"
        print(line)


if __name__ == "__main__":
    main()
