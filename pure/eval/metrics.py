"""Metric registry and the backends that compute metrics.

The maths is pyiqa's (never re-implemented here). This module only records, once, what each metric is:
its pyiqa name and settings, whether lower or higher is better, whether it needs a reference image, and
whether it compares two folders (FID) rather than image pairs. Importing it never imports pyiqa.

Backends implement `MetricBackend`; `PyiqaBackend` is the real one, tests inject their own.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the evaluation protocol.

    Attributes:
        name: our name (the CLI's ``--metrics`` value and the result key).
        pyiqa_name: the name given to ``pyiqa.create_metric``.
        lower_better: True when a lower score is better (LPIPS, DISTS, FID, NIQE).
        needs_reference: full-reference metric (needs GT images).
        folder_level: one score for a whole folder against a folder (FID), not per image pair.
        settings: keyword arguments for ``pyiqa.create_metric``; written into every result.
        label: column header in tables. decimals: digits shown in tables.
    """

    name: str
    pyiqa_name: str
    lower_better: bool
    needs_reference: bool
    label: str
    decimals: int
    folder_level: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def arrow(self) -> str:
        return "↓" if self.lower_better else "↑"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, written next to every score."""
        return {
            "pyiqa_name": self.pyiqa_name,
            "settings": dict(self.settings),
            "lower_better": self.lower_better,
            "needs_reference": self.needs_reference,
            "folder_level": self.folder_level,
        }


# PSNR/SSIM follow the common Real-ISR protocol: Y channel of BT.601 YCbCr. pyiqa's defaults differ
# (`psnr` uses all RGB channels, its Y option defaults to YIQ), so both are set explicitly.
_Y_CHANNEL = {"test_y_channel": True, "color_space": "ycbcr"}

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", "psnr", False, True, "PSNR", 2, settings=dict(_Y_CHANNEL)),
        MetricSpec("ssim", "ssim", False, True, "SSIM", 4, settings=dict(_Y_CHANNEL)),
        MetricSpec("lpips", "lpips", True, True, "LPIPS", 4),
        MetricSpec("dists", "dists", True, True, "DISTS", 4),
        MetricSpec("fid", "fid", True, True, "FID", 2, folder_level=True),
        MetricSpec("niqe", "niqe", True, False, "NIQE", 4),
        MetricSpec("musiq", "musiq", False, False, "MUSIQ", 2),
        MetricSpec("maniqa", "maniqa-pipal", False, False, "MANIQA", 4),
        MetricSpec("clipiqa", "clipiqa", False, False, "CLIPIQA", 4),
        MetricSpec("topiq_nr", "topiq_nr", False, False, "TOPIQ", 4),
    )
}

FULL_REFERENCE = tuple(name for name, spec in METRICS.items() if spec.needs_reference)
NO_REFERENCE = tuple(name for name, spec in METRICS.items() if not spec.needs_reference)


def get_metric(name: str) -> MetricSpec:
    """The registry entry for `name` (case-insensitive; ``topiq`` and ``maniqa-pipal`` are accepted too)."""
    key = name.strip().lower().replace("-", "_")
    key = {"topiq": "topiq_nr", "maniqa_pipal": "maniqa"}.get(key, key)
    if key not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}")
    return METRICS[key]


def parse_metrics(text: str | Sequence[str]) -> list[MetricSpec]:
    """Parse ``"psnr,ssim,lpips"`` (or a list of names) into registry entries, in the order given."""
    names = text.split(",") if isinstance(text, str) else list(text)
    specs: list[MetricSpec] = []
    for name in names:
        if not name.strip():
            continue
        spec = get_metric(name)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ValueError(f"--metrics names no metric; choose from: {', '.join(METRICS)}")
    return specs


ERROR_CHARS = 300  # a recorded error is cut here: a CUDA or pyiqa message can run to pages


def one_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``, at most `ERROR_CHARS` long: what a results table and a
    log line can hold, and enough to tell an out-of-memory from a missing file."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


class MetricUnavailable(RuntimeError):
    """A metric could not be set up (pyiqa missing, weights unreachable); the others go on."""

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__(f"{metric}: {reason}")
        self.metric = metric
        self.reason = reason


@runtime_checkable
class MetricBackend(Protocol):
    """Computes registered metrics. `name` and `version` are written into every result."""

    name: str
    version: str

    def score_pairs(self, spec: MetricSpec, preds: Sequence[Path], gts: Sequence[Path] | None) -> list[float]:
        """One score per prediction; `gts` is aligned with `preds` (None for no-reference metrics).

        Raises:
            MetricUnavailable: the metric cannot be set up here (it is skipped as a whole).
            Exception: anything else is a runtime failure of these images only: `evaluate` retries them
                one by one and records the images that still fail, leaving their cells empty.
        """
        ...

    def score_folders(self, spec: MetricSpec, pred_dir: Path, gt_dir: Path) -> float:
        """One score for a folder against a folder (`spec.folder_level`, e.g. FID)."""
        ...


class PyiqaBackend:
    """Metrics through pyiqa, imported on first use; one pyiqa model per metric, created once.

    Images are read with `pure.imageio.load_image` (RGB, alpha dropped) and handed to pyiqa as
    ``(1, 3, H, W)`` float tensors in [0, 1].
    """

    name = "pyiqa"

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self._models: dict[str, Any] = {}
        self._failed: dict[str, str] = {}

    @property
    def version(self) -> str:
        try:
            return importlib.metadata.version("pyiqa")
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def _model(self, spec: MetricSpec) -> Any:
        if spec.name in self._failed:
            raise MetricUnavailable(spec.name, self._failed[spec.name])
        if spec.name not in self._models:
            try:
                import pyiqa  # optional extra: pip install 'pure[eval]'
                import torch

                device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
                model = pyiqa.create_metric(spec.pyiqa_name, device=device, as_loss=False, **spec.settings)
                self._models[spec.name] = (model, device)
            except Exception as err:  # any failure to build one metric must not stop the others
                reason = one_line(err)
                if isinstance(err, ImportError):
                    reason = f"pyiqa cannot be imported ({err}); install it with pip install 'pure[eval]'"
                self._failed[spec.name] = reason
                raise MetricUnavailable(spec.name, reason) from err
        return self._models[spec.name]

    @staticmethod
    def _tensor(path: Path) -> Any:
        import numpy as np
        import torch

        from pure.imageio import load_image

        array = np.asarray(load_image(path).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)

    def score_pairs(self, spec: MetricSpec, preds: Sequence[Path], gts: Sequence[Path] | None) -> list[float]:
        import torch

        model, device = self._model(spec)
        scores: list[float] = []
        try:
            with torch.inference_mode():
                for i, pred in enumerate(preds):
                    x = self._tensor(pred).to(device)
                    if spec.needs_reference:
                        assert gts is not None, "full-reference metric called without references"
                        score = model(x, self._tensor(gts[i]).to(device))
                    else:
                        score = model(x)
                    scores.append(float(torch.as_tensor(score).float().mean()))
        except torch.cuda.OutOfMemoryError:
            # give the cached blocks back, so the image-by-image retry and the next metric can still fit
            torch.cuda.empty_cache()
            raise
        return scores

    def score_folders(self, spec: MetricSpec, pred_dir: Path, gt_dir: Path) -> float:
        model, _ = self._model(spec)
        return float(model(str(pred_dir), str(gt_dir)))
