"""pure.app: the web demo. Its logic runs without Gradio; the page itself is driven in headless Chromium."""

import importlib
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from native_checkpoint import NATIVE_SIZE, native_size_checkpoint
from PIL import Image

from pure import app

CHROMIUM = Path("/usr/bin/chromium")
# How Chromium runs on these machines: no sandbox as root, no GPU, and no background connections (the
# network is closed; without these flags Chromium keeps trying to reach Google's hosts).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOOPBACK = {"127.0.0.1", "localhost", None}  # None: data: and blob: URLs
VIEWPORT = {"width": 1400, "height": 1000}  # a laptop's browser window: Restore must be in it unscrolled


def test_import_and_main_without_gradio(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    monkeypatch.delitem(sys.modules, "pure.app")
    fresh = importlib.import_module("pure.app")
    # a model that does not exist: the Gradio check must come first, before any loading
    assert fresh.main(["--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "pip install 'pure[app]'" in err


def test_main_without_gradio_in_a_subprocess():
    code = "import sys; sys.modules['gradio'] = None; from pure.app import main; raise SystemExit(main([]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: the web demo needs Gradio: pip install 'pure[app]'"


@pytest.mark.parametrize(
    "scale, size, expected, notices",
    [
        ("auto", 512, (100, 60), 0),
        ("x4", 512, (128, 128), 1),
        ("x2", 64, (32, 32), 1),
        ("x1", 512, (512, 512), 1),
    ],
)
def test_prepare_input(scale, size, expected, notices):
    image = Image.new("RGB", (100, 60))
    out, notes = app.prepare_input(image, app.SCALES[scale], size)
    assert out.size == expected
    assert len(notes) == notices
    if notices:
        assert "aspect ratio not kept" in notes[0]
    native = Image.new("RGB", (16, 16))
    assert app.prepare_input(native, 4, 64) == (native, [])
    with pytest.raises(ValueError, match="scale"):
        app.prepare_input(image, 3, 512)


def test_restore_for_demo(tiny_restorer):
    image = Image.new("RGB", (32, 32), (90, 140, 200))
    # both texts forced: no text decoding, so this stays fast (the browser test lets the model write)
    out = app.restore_for_demo(
        tiny_restorer, image, scale="x4", seed=3, degradation=" Medium blur. ", caption="A blue sky.", size=64
    )
    assert out.image.size == out.lq_upsampled.size == (64, 64)
    assert out.entropy_map.width == 256 and out.entropy_map.height > 256  # heat map, bar and labels
    assert (out.degradation, out.caption) == ("Medium blur.", "A blue sky.")  # shown as used
    assert "seed 3" in out.info and "64x64 px" in out.info
    assert any("resized to 16x16" in n for n in out.notices)
    with pytest.raises(ValueError, match="seed"):
        app.restore_for_demo(tiny_restorer, image, seed=-1, size=64)
    with pytest.raises(ValueError, match="scale"):
        app.restore_for_demo(tiny_restorer, image, scale="x3", size=64)
    with pytest.raises(ValueError, match="cfg_scale"):
        app.restore_for_demo(tiny_restorer, image, cfg_scale=-1, size=64)


def test_restore_for_demo_defaults_to_the_checkpoint_s_native_size(tiny_checkpoint, tmp_path):
    from pure.restorer import PureRestorer

    restorer = PureRestorer.from_pretrained(
        native_size_checkpoint(tiny_checkpoint, tmp_path / "ckpt"), device="cpu"
    )
    image = Image.new("RGB", (100, 60), (90, 140, 200))

    out = app.restore_for_demo(restorer, image, scale="x4", degradation="Medium blur.", caption="A blue sky.")

    assert out.image.size == out.lq_upsampled.size == (NATIVE_SIZE, NATIVE_SIZE)
    assert any(f"resized to {NATIVE_SIZE // 4}x{NATIVE_SIZE // 4}" in n for n in out.notices)
    assert app.build_parser().parse_args([]).size is None  # main: the restorer's native size


def test_main_serves_on_loopback_by_default(tiny_checkpoint, monkeypatch):
    gr = pytest.importorskip("gradio")
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    assert app.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--size", "64"]) == 0
    assert launched["server_name"] == "127.0.0.1"
    assert launched["share"] is False


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "50"], "--size must be a positive multiple of 32"),
        (["--port", "0"], "--port must be within"),
        (["--model", "/nonexistent/model"], "error: "),
    ],
)
def test_main_errors_are_one_line(argv, message, capsys):
    pytest.importorskip("gradio")
    assert app.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_in_view_unscrolled(page, selector: str) -> None:
    """The element is inside the window without any scrolling."""
    box = page.locator(selector).bounding_box()
    assert page.evaluate("window.scrollY") == 0
    assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], (selector, box)


@pytest.mark.browser
# gradio 6.31's queue still uses pandas options that pandas 3 deprecates (not ours to fix)
@pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):DeprecationWarning")
def test_demo_page_in_headless_chromium(tiny_restorer, tmp_path):
    """Upload, Restore, and see the result, the texts and the entropy map in a real browser."""
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (Debian: apt-get install chromium)")
    expect = sync_api.expect
    upload = tmp_path / "lq.png"
    Image.effect_mandelbrot((32, 32), (-2, -1.5, 1, 1.5), 50).convert("RGB").save(upload)

    demo = app.build_demo(tiny_restorer, size=64)
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, share=False
    )
    requested_hosts = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh, empty profile
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                timeout=30_000,
                viewport=VIEWPORT,
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                page.on("request", lambda request: requested_hosts.append(urlparse(request.url).hostname))
                page.goto(url, wait_until="domcontentloaded")
                expect(page.locator("#restore")).to_be_visible()
                assert_in_view_unscrolled(page, "#restore")  # as the page opens (the empty upload is tall)
                page.locator("#lq input[type=file]").set_input_files(str(upload))
                expect(page.locator("#lq img")).to_be_visible()  # the upload's preview
                assert_in_view_unscrolled(page, "#restore")
                page.locator("#degradation textarea").fill("Medium blur, small noise.")
                page.locator("#seed input").fill("7")
                page.locator("#restore").click()

                expect(page.locator("#result img[src]").first).to_be_visible(timeout=45_000)
                expect(page.locator("#entropy img[src]")).to_be_visible()
                expect(page.locator("#caption textarea")).not_to_have_value("")  # the model's caption
                expect(page.locator("#degradation textarea")).to_have_value("Medium blur, small noise.")
                expect(page.locator("#info")).to_contain_text("seed 7")
                page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000  # kept in pytest's tmp_path to look at
    assert set(requested_hosts) <= LOOPBACK, "the page must work offline"


def test_the_page_starts_from_the_checkpoints_decoding_defaults(tiny_restorer):
    import copy

    pytest.importorskip("gradio")
    from pure.decoding.config import SamplingConfig

    restorer = copy.copy(tiny_restorer)  # the same model, another checkpoint's sampling.json
    restorer.sampling = SamplingConfig(cfg_scale=1.0, temperature=0.0)
    values = {
        block.elem_id: block.value
        for block in app.build_demo(restorer, size=64).blocks.values()
        if getattr(block, "elem_id", None) in ("guidance", "temperature")
    }
    assert values == {"guidance": 1.0, "temperature": 0.0}
    pures = {
        block.elem_id: block.value
        for block in app.build_demo(tiny_restorer, size=64).blocks.values()
        if getattr(block, "elem_id", None) in ("guidance", "temperature")
    }
    assert pures == {"guidance": SamplingConfig().cfg_scale, "temperature": SamplingConfig().temperature}
