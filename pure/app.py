"""``python -m pure.app``: a local web page to try a PURE model in the browser. See ``--help``.

Upload an image, pick the scale, guidance, temperature and seed, optionally write the caption or the
degradation yourself, and press Restore: the page shows the restoration next to the bicubic-upsampled input
(a slider), the model's degradation estimate and caption (editable, to steer the next run), and the
per-token entropy map. Gradio is an optional extra (``pip install 'pure[app]'``); importing this module
never needs it. The page is served on 127.0.0.1 only, unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from pure.model import HUB_MODEL_ID

if TYPE_CHECKING:
    import gradio as gr

    from pure.restorer import PureRestorer

INSTALL_HINT = "pip install 'pure[app]'"
AUTO_SCALE = "auto"
# Radio label -> upscaling factor. The output is always ``size`` px square (default the checkpoint's native
# size: 512 for PURE): "x4" treats the upload as a size/4 px low-quality image (resized to that first), as
# the x4 benchmarks do; "auto" hands the upload to the restorer as it is (size/4, size/2 and size px
# squares are its native x4/x2/x1).
SCALES: dict[str, int] = {AUTO_SCALE: 0, "x1": 1, "x2": 2, "x4": 4}
MAX_SEED = 2**31 - 1
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DemoOutput:
    """What one press of Restore shows."""

    lq_upsampled: Image.Image  # what the model saw: the input bicubic-upsampled to size x size
    image: Image.Image  # the restoration
    degradation: str  # "" when the model gave none
    caption: str
    entropy_map: Image.Image  # heat map of the image tokens' entropy, as large as the restoration (>= 256 px)
    info: str  # Markdown: size, timings, seed, notices
    notices: list[str] = field(default_factory=list)


def prepare_input(image: Image.Image, scale: int, size: int) -> tuple[Image.Image, list[str]]:
    """Resize the upload to ``size // scale`` px square for an explicit scale; ``scale=0`` leaves it as is."""
    if scale not in SCALES.values():
        raise ValueError(f"scale must be one of {sorted(SCALES.values())} (0 = auto); got {scale}")
    if scale == 0:
        return image, []
    side = size // scale
    if image.size == (side, side):
        return image, []
    note = f"x{scale}: the {image.width}x{image.height} px upload was resized to {side}x{side} px first"
    if image.width != image.height:
        note += " (aspect ratio not kept)"
    return image.resize((side, side), Image.BICUBIC), [note]


def restore_for_demo(
    restorer: PureRestorer,
    image: Image.Image,
    scale: str = AUTO_SCALE,
    cfg_scale: float | None = None,
    temperature: float | None = None,
    seed: int | float | None = 0,
    caption: str | None = None,
    degradation: str | None = None,
    color_fix: bool = True,
    size: int | None = None,
) -> DemoOutput:
    """One restoration as the page shows it (no Gradio needed; the page's button calls this).

    ``size``: the output side, default the restorer's native ``image_size`` (what its checkpoint was
    trained at).

    Empty ``caption``/``degradation`` let the model write its own; ``cfg_scale``/``temperature`` of ``None``
    keep the restorer's (its checkpoint's ``sampling.json``, else PURE's defaults). Raises ``ValueError``
    with a message for the user.
    """
    from pure.imageio import NOTICE_KEY
    from pure.viz import HEAT_MIN_SIDE, entropy_map

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    seed = 0 if seed is None else int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be within 0..{MAX_SEED}; got {seed}")
    overrides = {"cfg_scale": cfg_scale, "temperature": temperature}
    overrides = {k: float(v) for k, v in overrides.items() if v is not None}
    size = restorer.image_size if size is None else size
    lq, notices = prepare_input(image, SCALES[scale], size)
    result = restorer.restore(
        lq,
        seed=seed,
        caption=(caption or "").strip() or None,
        degradation=(degradation or "").strip() or None,
        size=size,
        color_fix=bool(color_fix),
        **overrides,
    )
    notices = [n for n in (image.info.get(NOTICE_KEY),) if n] + notices + result.notices
    if result.degradation is None:
        notices.append("the model gave no degradation estimate; write one to steer it")
    t = result.timings
    info = (
        f"**{result.image.width}x{result.image.height} px** in {t['total_s']:.1f} s "
        f"(text {t['text_s']:.1f} s, image {t['image_s']:.1f} s, {t['forward_passes']} forward passes, "
        f"{t['cpu_threads']} CPU threads) · "
        f"seed {result.seed} · guidance {result.settings['cfg_scale']:g} · "
        f"temperature {result.settings['temperature']:g} · model `{restorer.identity.get('model', '?')}`"
    )
    info += "".join(f"\n- {n}" for n in notices)
    return DemoOutput(
        lq_upsampled=result.lq_upsampled,
        image=result.image,
        degradation=result.degradation or "",
        caption=result.caption,
        # as large as the restoration, so token blocks line up with it; at least 256 px to be readable
        entropy_map=entropy_map(result.entropy, size=max(HEAT_MIN_SIDE, *result.image.size)),
        info=info,
        notices=notices,
    )


def build_demo(restorer: PureRestorer, size: int | None = None) -> gr.Blocks:
    """The page as a ``gr.Blocks`` (not launched): ``build_demo(r).launch(server_name="127.0.0.1")``.

    ``size``: the output side, default the restorer's native ``image_size``.

    Element ids for scripts and tests: ``#lq`` (upload), ``#restore`` (button), ``#result`` (slider with the
    upsampled input and the restoration), ``#degradation`` and ``#caption`` (text boxes), ``#entropy``
    (heat map), ``#info`` (timings and notices).
    """
    import gradio as gr

    from pure.imageio import ImageLoadError, load_image
    from pure.restorer import native_input_sides

    defaults = restorer.sampling  # the checkpoint's (its sampling.json), else PURE's
    size = restorer.image_size if size is None else size
    natives = ", ".join(str(side) for side in native_input_sides(size))

    def on_restore(path, scale, cfg_scale, temperature, seed, caption, degradation, color_fix):
        if not path:
            raise gr.Error("Upload an image first.")
        try:
            out = restore_for_demo(
                restorer,
                load_image(path),
                scale=scale,
                cfg_scale=cfg_scale,
                temperature=temperature,
                seed=seed,
                caption=caption,
                degradation=degradation,
                color_fix=color_fix,
                size=size,
            )
        except (ImageLoadError, ValueError) as err:
            raise gr.Error(str(err)) from None
        return (out.lq_upsampled, out.image), out.degradation, out.caption, out.entropy_map, out.info

    with gr.Blocks(title="PURE image restoration", analytics_enabled=False) as demo:
        gr.Markdown(
            "# PURE: Perceive, Understand, REstore\n"
            f"Upload a low-quality image and press **Restore**. The output is {size}x{size} px. The model "
            "first writes what it sees (degradation, caption), then restores the image token by token; "
            "edit either text box to steer the next run, or clear it to let the model write its own."
        )
        with gr.Row():
            with gr.Column(scale=1):
                lq = gr.Image(
                    label="Low-quality input",
                    type="filepath",  # read by pure.imageio: EXIF orientation, 16-bit, alpha, clear errors
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    elem_id="lq",
                )
                # right under the upload: in view without scrolling (a 1400x1000 window, the test's)
                run = gr.Button("Restore", variant="primary", elem_id="restore")
                scale = gr.Radio(
                    list(SCALES),
                    value=AUTO_SCALE,
                    label="Scale",
                    info=f"x2/x4: the upload is treated as a {size // 2}/{size // 4} px image; "
                    f"auto: as it is ({natives} px squares are x4, x2, x1 at {size})",
                    elem_id="scale",
                )
                with gr.Row():
                    cfg_scale = gr.Slider(
                        0.0,
                        5.0,
                        value=defaults.cfg_scale,
                        step=0.1,
                        label="Guidance",
                        info="classifier-free guidance; 1 = none",
                        elem_id="guidance",
                    )
                    temperature = gr.Slider(
                        0.0,
                        2.0,
                        value=defaults.temperature,
                        step=0.05,
                        label="Temperature",
                        info="of the image tokens; 0 = greedy",
                        elem_id="temperature",
                    )
                with gr.Row():
                    seed = gr.Number(
                        value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed"
                    )
                    color_fix = gr.Checkbox(value=True, label="Wavelet colour fix", elem_id="color-fix")
                degradation = gr.Textbox(
                    label="Degradation",
                    placeholder="empty: the model estimates it, e.g. 'Medium blur, small noise.'",
                    elem_id="degradation",
                )
                caption = gr.Textbox(
                    label="Caption",
                    placeholder="empty: the model describes the image",
                    lines=2,
                    elem_id="caption",
                )
                clear = gr.Button("Clear texts", variant="secondary", elem_id="clear-texts")
            with gr.Column(scale=2):
                result = gr.ImageSlider(
                    label="input (bicubic) | restored",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="result",
                )
                info = gr.Markdown(elem_id="info")
                heat = gr.Image(
                    label="Token entropy (nats): where the model was unsure",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="entropy",
                )
        run.click(
            on_restore,
            inputs=[lq, scale, cfg_scale, temperature, seed, caption, degradation, color_fix],
            outputs=[result, degradation, caption, heat, info],
            api_name="restore",
            concurrency_limit=1,  # one model, one restoration at a time
        )
        clear.click(lambda: ("", ""), outputs=[degradation, caption], api_name=False)
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pure.app",
        description="Start a local web page (Gradio) to restore images with a PURE model: upload, choose "
        "scale, guidance, temperature and seed, steer with your own caption, compare the result.",
        epilog="example:\n  python -m pure.app --model examples/pure-tiny   # then open http://127.0.0.1:7860",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=HUB_MODEL_ID, help=f"checkpoint folder or Hub id (default {HUB_MODEL_ID})"
    )
    p.add_argument("--vq", help="VQ tokenizer: LlamaGen's vq_ds8_c2i.pt or a folder (default: <model>/vq)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of torch (default: OMP_NUM_THREADS if set, else 1 for a small model: pure.infer)",
    )
    p.add_argument(
        "--size",
        type=int,
        help="output side in px (default: the checkpoint's native size, 512 for PURE; see pure.infer)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (off by default)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401 -- only to fail early, before loading a model
    except ImportError:
        print(f"error: the web demo needs Gradio: {INSTALL_HINT}", file=sys.stderr)
        return 2
    import torch

    from pure.model import ModelLoadError
    from pure.restorer import GRID_PX, PureRestorer

    if args.size is not None and (args.size <= 0 or args.size % GRID_PX):
        print(f"error: --size must be a positive multiple of {GRID_PX}; got {args.size}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"error: --port must be within 1..65535; got {args.port}", file=sys.stderr)
        return 2
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    try:
        restorer = PureRestorer.from_pretrained(
            args.model,
            vq=args.vq,
            device=args.device,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            threads=args.threads or "auto",
        )
    except (ModelLoadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_demo(restorer, size=args.size)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="64mb")
    except OSError as err:  # port taken, address not available
        print(f"error: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
