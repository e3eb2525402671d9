"""Numbers the PURE paper reports (×4, 512² outputs; repo figs/quantitative*.png, spec §7.4).

They are copied, not measured here: every table that shows them marks them "reported".
"""

from __future__ import annotations

SOURCE = "PURE paper (nonwhy/PURE figs/quantitative*.png; ×4, 512 px outputs)"

# test set -> metric name (as in pure.eval.metrics.METRICS) -> score
REPORTED: dict[str, dict[str, float]] = {
    "ost-val": {
        "psnr": 18.52, "ssim": 0.4181, "lpips": 0.3863, "dists": 0.2052, "fid": 55.19,
        "niqe": 4.7977, "musiq": 74.81, "maniqa": 0.6424, "clipiqa": 0.7581, "topiq_nr": 0.8148,
    },
    "realsr": {
        "psnr": 22.83, "ssim": 0.6079, "lpips": 0.3821, "dists": 0.2458, "fid": 188.33,
        "niqe": 5.4090, "musiq": 72.37, "maniqa": 0.4527, "clipiqa": 0.6817, "topiq_nr": 0.7165,
    },
    "drealsr": {
        "psnr": 24.73, "ssim": 0.6459, "lpips": 0.3452, "dists": 0.2076, "fid": 79.41,
        "niqe": 5.4846, "musiq": 73.28, "maniqa": 0.5251, "clipiqa": 0.7259, "topiq_nr": 0.7560,
    },
    "reallq250": {"niqe": 4.5054, "musiq": 74.10, "maniqa": 0.5409, "clipiqa": 0.7711, "topiq_nr": 0.7751},
}  # fmt: skip

SET_NAMES = {"ost-val": "OST-Val", "realsr": "RealSR", "drealsr": "DRealSR", "reallq250": "RealLQ250"}


def canonical_set(name: str) -> str:
    """``"RealSR"``, ``"ost_val"``, ``"OST-Val"`` -> a `REPORTED` key; other names pass through lowered."""
    key = name.strip().lower().replace("_", "-")
    return {"ostval": "ost-val", "real-sr": "realsr", "dreal-sr": "drealsr", "reallq-250": "reallq250"}.get(
        key, key
    )
