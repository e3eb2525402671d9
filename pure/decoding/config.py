"""The decoding settings a user chooses, and text a user may force (:mod:`pure.decoding.loop` takes both)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pure.decoding.sampling import EntropyTopKLogitsWarper, TopKLogitsWarper

JACOBI_DRAFTS = ("input", "random")


@dataclass
class SamplingConfig:
    """Decoding settings. Defaults are the PURE README's (spec 4.1)."""

    cfg_scale: float = 0.8
    temperature: float = 0.9
    min_k: int = 1
    max_k: int = 2000
    text_top_k: int = 1
    # the answer text's tokens (degradation sentence and caption) before <boi> is forced: PURE's captions are
    # LLaVA's, which pure.data.captions caps at 512 tokens, after a sentence of about 8; 768 leaves room for a
    # tokenizer that splits finer, for ~6% more KV cache slots at 512 px than 256 took
    max_text_tokens: int = 768
    jacobi_window: int = 0  # speculative Jacobi decoding of the image: window size; 0 = one token per forward
    # Jacobi's fresh drafts: "random" codes, or "input": the LQ image's code at the same grid position (where
    # the prompt's LQ grid is the output's). Lossless either way; they differ in how many are accepted (on
    # the first PURE-tiny, within noise: README)
    jacobi_drafts: str = "random"
    # Jacobi's recycled drafts coupled to the previous iteration's (MC-SJD; lossless either way)
    jacobi_coupled: bool = True
    # row-parallel decoding of the image (pure.decoding.rows; lossy, opt-in): a row starts once the row above
    # has this many codes, and the active rows advance together; 0 = off. A lag of the grid's width or more
    # gives the one-token loop's image. With jacobi_window too, each row advances by speculative windows
    # (pure.decoding.fronts): the same image as row_lag alone, in fewer forwards
    row_lag: int = 0

    def __post_init__(self) -> None:
        # `not x >= 0` also rejects NaN
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale must be >= 0 (1 = no guidance); got {self.cfg_scale}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if self.text_top_k < 1:
            raise ValueError(f"text_top_k must be >= 1 (1 = greedy text); got {self.text_top_k}")
        if self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1; got {self.max_text_tokens}")
        if self.jacobi_window != 0 and self.jacobi_window < 2:
            raise ValueError(
                f"jacobi_window must be 0 (off) or >= 2 (16 is the default); got {self.jacobi_window}"
            )
        if isinstance(self.row_lag, bool) or not isinstance(self.row_lag, int) or self.row_lag < 0:
            raise ValueError(f"row_lag must be 0 (off) or a number of codes >= 1; got {self.row_lag!r}")
        if self.jacobi_drafts not in JACOBI_DRAFTS:
            raise ValueError(f"jacobi_drafts must be one of {JACOBI_DRAFTS}; got {self.jacobi_drafts!r}")
        EntropyTopKLogitsWarper(self.min_k, self.max_k)  # validates
        TopKLogitsWarper(self.text_top_k)


@dataclass
class TextPrior:
    """Text to force instead of generating it (steering); ``None`` lets the model write it."""

    degradation: str | None = None
    caption: str | None = None


# A checkpoint's own decoding defaults: `SamplingConfig` fields in the checkpoint folder, as a Hugging Face
# model carries its generation_config.json. PURE's defaults (spec 4.1) hold where the file is absent or
# silent; what a user passes (a command-line option, a ``sampling`` argument) overrides either.
SAMPLING_FILE = "sampling.json"


def read_sampling(folder: str | os.PathLike) -> SamplingConfig:
    """The decoding defaults of a checkpoint folder: its :data:`SAMPLING_FILE`'s fields over PURE's.

    Raises ``ValueError`` naming the file for anything but a JSON object of valid `SamplingConfig` fields,
    so that a typo in it is an error at load time, never a silently different restoration.
    """
    path = Path(folder) / SAMPLING_FILE
    if not path.is_file():
        return SamplingConfig()
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: must be a JSON object of SamplingConfig fields")
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name, value in fields.items():
        kind = type(getattr(SamplingConfig, name))  # the default's: bool, int, float or str
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not fits and not (kind is float and type(value) is int):
            raise ValueError(f"{path}: {name} must be a JSON {kind.__name__}; got {value!r}")
    try:
        return SamplingConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
