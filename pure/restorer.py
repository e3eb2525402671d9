"""The Python API: ``PureRestorer.from_pretrained(...).restore(image)`` -> :class:`RestoreResult`."""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from pure.colorfix import wavelet_color_fix
from pure.decoding.config import read_sampling
from pure.decoding.loop import (
    RestorationDecoder,
    SamplingConfig,
    TextPrior,
    check_compile,
    synchronize,
)
from pure.imageio import SOURCE_MODE_KEY
from pure.model import HUB_MODEL_ID, ModelLoadError, load_model, resolve_checkpoint
from pure.quant import check_quantize
from pure.sequence import LATENT_PER_GRID, SequenceFormat, split_answer_text
from pure.tokenizer import PureTokenizer
from pure.vq import VQModel, pil_to_pixels, pixels_to_pil

# PURE is trained on 512 px HQ crops: the native size of a checkpoint that names none
DEFAULT_IMAGE_SIZE = 512
OUTPUT_SIZE = DEFAULT_IMAGE_SIZE  # the former name, kept for callers that import it
# config.json key (a PretrainedConfig extra attribute) naming the HQ crop side a checkpoint was trained at,
# e.g. 128 for a model trained on 128 px crops (absent: DEFAULT_IMAGE_SIZE); every default size follows it
IMAGE_SIZE_KEY = "pure_image_size"
LATENT_PX = 8  # pixels per latent of the LlamaGen VQ-8 (8x downsampling)
GRID_PX = LATENT_PER_GRID * LATENT_PX  # pixels per grid token with the 8x VQ: sizes are multiples of this
DECODERS_KEPT = 4  # sampling settings whose decoders (and compiled steps) a restorer keeps
# How a notice names an input's colour mode (others by PIL's name: RGBA, CMYK, ...)
MODE_NAMES = {"P": "palette", "PA": "palette", "L": "grayscale", "LA": "grayscale", "La": "grayscale"}
ASPECT_NOT_KEPT = "aspect ratio not kept"  # ends the notice of a non-square input squashed square
NATIVE_SCALES = (1, 2, 4)  # size, size/2 and size/4 px square inputs are upsampled without any other change

# Models under this many parameters decode on one CPU thread unless told otherwise: their per-token matmuls
# are too small for torch's threads to pay for their synchronisation, and with other work on the machine the
# default (a thread per core) collapses. PURE-tiny (5.7 M) on the 2-core machine under a load of ~12:
# 6.0-7.2 s for a 128 px restoration with one thread, 61-167 s with two (the same codes).
ONE_THREAD_PARAMETERS = 100_000_000

# ``progress`` of restore_batch: a bar (True), none (False), or a callback told how many more image tokens of
# the batch were decoded (all rows together), for a caller that draws its own bar.
Progress = bool | Callable[[int], None]


def native_input_sides(size: int) -> tuple[int, ...]:
    """The square input sides restored without a resize notice at output ``size``: x4, x2, x1."""
    return tuple(size // s for s in reversed(NATIVE_SCALES) if size % s == 0)


def is_native_input(image_size: tuple[int, int], size: int) -> bool:
    """Whether a ``(w, h)`` input is one of the native squares of output ``size`` (see NATIVE_SCALES)."""
    w, h = image_size
    return w == h and w in native_input_sides(size)


def image_size_of(config, grid_px: int = GRID_PX) -> int:
    """The native image side of a model ``config``: its :data:`IMAGE_SIZE_KEY`, else 512 (PURE's).

    Raises ``ValueError`` for a value that is not a positive multiple of ``grid_px``, so a bad
    ``config.json`` fails on load, not in the middle of a run.
    """
    value = getattr(config, IMAGE_SIZE_KEY, None)
    if value is None:
        return DEFAULT_IMAGE_SIZE
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % grid_px:
        raise ValueError(
            f"config.json: {IMAGE_SIZE_KEY} must be a positive multiple of {grid_px}; got {value!r}"
        )
    return value


@dataclass
class RestoreResult:
    """One restoration.

    Attributes:
        image: the restored image (RGB, ``size x size``), colour-fixed unless disabled.
        lq_upsampled: the input after bicubic upsampling to the output size (what the model saw).
        degradation: the Perceive answer, e.g. ``"Medium blur, small noise."`` (``None`` if the model's
            text did not start with one).
        caption: the Understand answer.
        codes: ``(h, w)`` int64 VQ codes of the restored image.
        entropy: ``(h, w)`` float nats, the entropy of each image token's distribution (sets its top-k).
        notices: what was done to the input (resizing, conversions) or to the text, one line each.
        text_cut: the model's text reached ``max_text_tokens`` and ``<boi>`` was forced after it, so the image
            follows a caption cut short (see :data:`TEXT_CUT_NOTICE`).
    """

    image: Image.Image
    lq_upsampled: Image.Image
    degradation: str | None
    caption: str
    text: str
    codes: torch.Tensor
    entropy: torch.Tensor
    seed: int
    settings: dict
    timings: dict
    notices: list[str] = field(default_factory=list)
    text_cut: bool = False


@dataclass
class TextAnswer:
    """What :meth:`PureRestorer.describe_answers` finds in one image: the Perceive and Understand answers,
    and whether the text reached ``max_text_tokens`` and was cut there."""

    degradation: str | None
    caption: str
    text_cut: bool = False


# The notice of a restoration whose text reached the limit (RestoreResult.text_cut).
TEXT_CUT_NOTICE = (
    "the model's text reached max_text_tokens ({limit}) and was cut there, so the image follows a cut "
    "caption; raise the limit (--max-text-tokens) to let it finish"
)


def choose_cpu_threads(
    parameters: int, requested: int | None = None, environ: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """The intra-op CPU thread count to decode with, and where it comes from.

    ``requested`` (``--threads``) wins; then ``OMP_NUM_THREADS`` (``environ``, default ``os.environ``), which
    torch reads too; else one thread for a model of fewer than :data:`ONE_THREAD_PARAMETERS` ``parameters``,
    and ``None`` (leave torch's default, a thread per core) for a bigger one.
    """
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1; got {requested}")
        return requested, "requested (--threads)"
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), "OMP_NUM_THREADS"
    if parameters < ONE_THREAD_PARAMETERS:
        limit = ONE_THREAD_PARAMETERS / 1e6
        return 1, f"auto: one for a model under {limit:.0f} M parameters ({parameters / 1e6:.1f} M)"
    return None, "auto: torch's default, a thread per core"


def text_notices(text_cut: bool, sampling: SamplingConfig) -> list[str]:
    """The notice of a text cut at ``sampling.max_text_tokens`` (none when it was not cut)."""
    return [TEXT_CUT_NOTICE.format(limit=sampling.max_text_tokens)] if text_cut else []


class PureRestorer:
    """A PURE model, its tokenizer and its VQ image tokenizer on one device."""

    def __init__(
        self,
        model,
        tokenizer: PureTokenizer,
        vq: VQModel,
        identity: dict | None = None,
        image_size: int | None = None,
        compile: bool | str = False,
        sampling: SamplingConfig | None = None,
    ):
        """``image_size``: the native output side; default the model config's :data:`IMAGE_SIZE_KEY`
        (512 when absent). ``sampling``: the decoding settings of every call that passes none (default
        PURE's; :meth:`from_pretrained` reads the checkpoint's ``sampling.json``). ``compile``: capture the
        per-token image step (``compile`` of :class:`pure.decoding.loop.RestorationDecoder`: ``True`` for
        CUDA graphs on CUDA, or a ``torch.compile`` backend such as ``"inductor"`` on any device); the first
        image of each sampling setting pays for it, the next ones reuse it (:meth:`decoder`)."""
        if tokenizer.vocab.codebook_size != vq.config.codebook_size:
            raise ValueError(
                f"the tokenizer names {tokenizer.vocab.codebook_size} image tokens but the VQ has "
                f"{vq.config.codebook_size} codes: they must come from the same checkpoint"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.format = SequenceFormat(tokenizer)
        self.vq = vq
        self.identity = identity or {}
        grid_px = LATENT_PER_GRID * vq.config.downsample
        config = getattr(model, "config", None)
        self.image_size = image_size_of(config, grid_px) if image_size is None else image_size
        self._check_size(self.image_size)
        check_compile(compile)
        self.compile = compile
        self.sampling = sampling or SamplingConfig()
        self.threads_from = "as found"  # why torch has its CPU threads (from_pretrained may set them)
        self._decoders: OrderedDict[tuple, RestorationDecoder] = OrderedDict()

    def decoder(self, sampling: SamplingConfig) -> RestorationDecoder:
        """The decoder of ``sampling``; the last :data:`DECODERS_KEPT` settings' decoders are kept, so a
        compiled step is reused by the next calls rather than compiled again."""
        key = astuple(sampling)
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            decoder = RestorationDecoder(self.model, self.format, replace(sampling), self.compile)
        self._decoders[key] = decoder
        while len(self._decoders) > DECODERS_KEPT:
            self._decoders.popitem(last=False)
        return decoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = HUB_MODEL_ID,
        vq: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        compile: bool | str = False,
        quantize: str | None = None,
        threads: int | str | None = None,
    ) -> PureRestorer:
        """Load a checkpoint folder or Hub id.

        Args:
            model: folder or Hub id holding ``config.json``, safetensors weights and ``tokenizer.json``
                (``nonwhy/PURE`` by default).
            vq: the LlamaGen VQ (``vq_ds8_c2i.pt``, or a folder saved by :meth:`VQModel.save_pretrained`);
                defaults to the checkpoint's ``vq/`` folder.
            tokenizer: a tokenizer file overriding the checkpoint's ``tokenizer.json``.
            The checkpoint's decoding defaults, its ``sampling.json`` (PURE's where absent or silent:
            :func:`pure.decoding.config.read_sampling`), become :attr:`sampling`.
            device: default CUDA when available, else CPU. dtype: default bf16 on CUDA, fp32 on CPU.
            compile: capture the per-token image step (see :class:`PureRestorer`).
            quantize: ``"int8"`` or ``"int4"``: weight-only quantisation of the decoder's linear layers
                (:mod:`pure.quant`; needs torchao, the ``quant`` extra), from the bf16 checkpoint.
            threads: torch's intra-op CPU threads, for the whole process (``torch.set_num_threads``): a count,
                ``"auto"`` (``OMP_NUM_THREADS`` if set, else one for a model under
                :data:`ONE_THREAD_PARAMETERS` parameters on a CPU: :func:`choose_cpu_threads`; what
                ``pure.infer`` and ``pure.app`` use), or ``None`` (default) to leave them as they are. Result
                timings record the count and why.
        """
        if threads is not None and threads != "auto" and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads must be 'auto' or a count >= 1; got {threads!r}")
        check_compile(compile)  # before loading the weights
        check_quantize(quantize)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        folder = resolve_checkpoint(model)
        vq_path = Path(vq) if vq is not None else folder / "vq"
        if not vq_path.exists():
            raise ModelLoadError(
                f"no VQ tokenizer: {folder} has no vq/ folder; pass --vq vq_ds8_c2i.pt "
                "(LlamaGen's VQ-8, from the FoundationVision/LlamaGen Hub repo)"
            )
        try:
            sampling = read_sampling(folder)  # before the weights: a bad file fails in a second
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
        lm = load_model(
            folder, device=device, dtype=dtype, attn_implementation=attn_implementation, quantize=quantize
        )
        tokenizer_file = Path(tokenizer) if tokenizer is not None else folder / "tokenizer.json"
        text = PureTokenizer.from_file(
            tokenizer_file, vocabulary_map=lm.config.vocabulary_map, vocab_size=lm.config.vocab_size
        )
        image_tokenizer = VQModel.from_pretrained(vq_path, device=device)
        identity = {
            "model": str(model),
            "vq": str(vq_path),
            "tokenizer": str(tokenizer_file),
            "dtype": str(dtype),
        }
        if quantize is not None:  # absent otherwise: records of unquantised runs keep their identity
            identity["quantize"] = quantize
        restorer = cls(lm, text, image_tokenizer, identity, compile=compile, sampling=sampling)
        if threads is not None:
            requested = None if threads == "auto" else threads
            count, why = choose_cpu_threads(sum(p.numel() for p in lm.parameters()), requested)
            if device.type == "cpu" or requested is not None:  # a GPU's decode barely uses CPU threads
                if count is not None:
                    torch.set_num_threads(count)
                restorer.threads_from = why
        return restorer

    # -- input preparation ------------------------------------------------------------------------------

    def upsample_input(self, image: Image.Image, size: int | None = None) -> tuple[Image.Image, list[str]]:
        """Blend transparency onto white and bicubic-upsample to ``size x size`` (default: the native size).

        Square inputs of ``size``, ``size/2`` or ``size/4`` px are the native x1/x2/x4 cases; any other
        size is resized to ``size x size`` too, with a notice (the aspect ratio is not kept).
        """
        size = self.image_size if size is None else size
        notices = []
        if image.mode != "RGB":
            rgb = pixels_to_pil(pil_to_pixels(image))  # the VQ's own conversion (alpha over white)
            source = image.info.get(SOURCE_MODE_KEY, image.mode)  # the file's, when load_image converted it
            kind = MODE_NAMES.get(source, source)
            if image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in image.info:
                notices.append(f"{kind} input with transparency converted to RGB (blended onto white)")
            else:
                notices.append(f"{kind} input converted to RGB")
            image = rgb
        w, h = image.size
        if not is_native_input((w, h), size):
            native = ", ".join(str(side) for side in native_input_sides(size))
            aspect = "" if w == h else f"; {ASPECT_NOT_KEPT}"
            notices.append(f"input is {w}x{h} px, not {native} px square: resized to {size}x{size}{aspect}")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        return image, notices

    # -- restoration ------------------------------------------------------------------------------------

    def restore(
        self,
        image: Image.Image,
        seed: int = 0,
        caption: str | None = None,
        degradation: str | None = None,
        **kwargs,
    ) -> RestoreResult:
        """Restore one image; other keyword arguments as :meth:`restore_batch`."""
        return self.restore_batch(
            [image], seeds=[seed], captions=[caption], degradations=[degradation], **kwargs
        )[0]

    def _check_size(self, size: int) -> None:
        grid_px = LATENT_PER_GRID * self.vq.config.downsample
        if size <= 0 or size % grid_px:
            raise ValueError(f"size must be a positive multiple of {grid_px}; got {size}")

    def _prompts(self, images: list[Image.Image], size: int):
        """Upsampled inputs with their notices, LQ codes ``(B, h, w)`` and prompt ids ``(B, T)``."""
        prepared = [self.upsample_input(img, size) for img in images]
        pixels = torch.stack([pil_to_pixels(up) for up, _ in prepared]).to(self.device)
        lq_codes = self.vq.encode(pixels)  # (B, h, w)
        prompts = torch.stack([self.format.prompt_ids(c) for c in lq_codes]).to(self.device)
        return prepared, lq_codes, prompts

    @torch.inference_mode()
    def describe(
        self,
        images: list[Image.Image],
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
        size: int | None = None,
    ) -> list[tuple[str | None, str]]:
        """Perceive and Understand only (cheap: no image tokens): ``(degradation, caption)`` per image.

        ``size``: the side the images are upsampled to first (default the native :attr:`image_size`).
        """
        return [(a.degradation, a.caption) for a in self.describe_answers(images, sampling, seeds, size)]

    @torch.inference_mode()
    def describe_answers(
        self,
        images: list[Image.Image],
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
        size: int | None = None,
    ) -> list[TextAnswer]:
        """:meth:`describe`, with each text's :attr:`TextAnswer.text_cut` (it reached ``max_text_tokens``)."""
        size = self.image_size if size is None else size
        self._check_size(size)
        if not images:
            return []
        seeds = [0] * len(images) if seeds is None else seeds
        _, _, prompts = self._prompts(images, size)
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        sampling = sampling or self.sampling
        texts = self.decoder(sampling).describe(prompts, generators=generators)
        # nothing is forced here, so a text is cut exactly when it is as long as the limit (engine._TextRow)
        return [
            TextAnswer(*split_answer_text(self.tokenizer.decode(ids)), len(ids) >= sampling.max_text_tokens)
            for ids in texts
        ]

    @torch.inference_mode()
    def restore_batch(
        self,
        images: list[Image.Image],
        sampling: SamplingConfig | None = None,
        seeds: list[int] | None = None,
        captions: list[str | None] | None = None,
        degradations: list[str | None] | None = None,
        color_fix: bool = True,
        size: int | None = None,
        progress: Progress = False,
        forced_text: str | None = None,
        **overrides,
    ) -> list[RestoreResult]:
        """Restore several images in one batch; each result equals that of a single-image call.

        Args:
            images: PIL images (any mode PIL opens; see :func:`pure.imageio.load_image`).
            sampling: decoding settings (default :attr:`sampling`, the checkpoint's); keyword ``overrides``
                (e.g. ``cfg_scale=1.0``) replace fields.
            seeds: one seed per image (default 0 for all); the same seed gives the same output.
            captions, degradations: per-image text to force instead of the model's (steering). A caption
                alone still lets the model write its own degradation sentence first.
            color_fix: apply the wavelet colour fix against the upsampled input.
            size: output side in px (a multiple of :data:`GRID_PX`); default the native :attr:`image_size`.
            progress: a bar over image rows, or a callback given each increment of decoded image tokens
                (see :data:`Progress`).
            forced_text: the whole answer text of every image, forced verbatim (the model writes no text),
                e.g. ``"Medium blur, small noise. A lion. "`` or a text without a degradation sentence; tiled
                restoration uses it so that every tile is conditioned on exactly the same words. Not
                together with ``captions``/``degradations``.
        """
        size = self.image_size if size is None else size
        self._check_size(size)
        sampling = SamplingConfig(**{**asdict(sampling or self.sampling), **overrides})
        n = len(images)
        if n == 0:
            return []
        seeds = [0] * n if seeds is None else seeds
        captions = [None] * n if captions is None else captions
        degradations = [None] * n if degradations is None else degradations
        if not len(seeds) == len(captions) == len(degradations) == n:
            raise ValueError("seeds, captions and degradations need one entry per image")
        if forced_text is not None and (any(captions) or any(degradations)):
            raise ValueError("give either forced_text or captions/degradations, not both")
        device = self.device
        synchronize(device)  # each clock read waits for the device's queued work (CUDA runs asynchronously)
        start = time.perf_counter()

        prepared, lq_codes, prompts = self._prompts(images, size)
        synchronize(device)
        encoded = time.perf_counter()

        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        decoder = self.decoder(sampling)
        h, w = lq_codes.shape[1:]
        if forced_text is None:
            priors = [TextPrior(d, c) for d, c in zip(degradations, captions, strict=True)]
            out = decoder.generate(prompts, h, w, priors=priors, generators=generators, progress=progress)
            answers, text_cut = out.answer_ids, out.text_cut
        else:
            # the text joins the prompt, so no row can drift from it (a caption-only prior would let each
            # row write its own degradation sentence); the same sequence as forcing it token by token
            text_ids = torch.tensor(self.format.encode_text(forced_text), dtype=torch.long)
            prompts = torch.cat([prompts, text_ids.to(device).expand(n, -1)], dim=1)
            out = decoder.generate_image(prompts, h, w, generators=generators, progress=progress)
            answers, text_cut = [torch.cat([text_ids, ids]) for ids in out.answer_ids], [False] * n

        parsed = [self.format.parse_answer(ids, strict=True) for ids in answers]
        hq_codes = torch.stack([p.codes for p in parsed]).to(device)
        # one image at a time: batched convolutions may round differently, and a batch must equal single runs
        restored = torch.cat([self.vq.decode(codes[None]) for codes in hq_codes]).cpu()  # .cpu() waits
        decoded = time.perf_counter()

        results = []
        for i, answer in enumerate(parsed):
            image = pixels_to_pil(restored[i])
            lq_up = prepared[i][0]
            if color_fix:
                image = wavelet_color_fix(image, lq_up)
            timings = {
                "encode_s": encoded - start,
                "text_s": out.seconds["text"],
                "image_s": out.seconds["image"],
                "decode_s": decoded - encoded - out.seconds["text"] - out.seconds["image"],
                "total_s": time.perf_counter() - start,
                "forward_passes": out.forward_passes,
                "image_forward_passes": out.image_forward_passes,
                "image_tokens_fed": out.image_tokens_fed,
                "batch_size": n,
                "cpu_threads": torch.get_num_threads(),
                "cpu_threads_from": self.threads_from,
            }
            settings = {**asdict(sampling), "color_fix": color_fix, "size": size}
            results.append(
                RestoreResult(
                    image=image,
                    lq_upsampled=lq_up,
                    # what was forced is what was used, even if the model's own words around it differ
                    degradation=degradations[i].strip() if degradations[i] else answer.degradation,
                    caption=captions[i].strip() if captions[i] else answer.caption,
                    text=answer.text,
                    codes=answer.codes,
                    entropy=out.entropy[i],
                    seed=seeds[i],
                    settings=settings,
                    timings=timings,
                    notices=prepared[i][1] + text_notices(text_cut[i], sampling),
                    text_cut=text_cut[i],
                )
            )
        return results
