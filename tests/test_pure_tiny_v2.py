"""PURE-tiny v2's recipe: its files parse and point at each other, its scripts are valid bash, and the VQ
curve step measures a tokenizer run and appends a point (on a tiny VQ; the real run is hours of CPU)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pure.train.config import load_recipe
from pure.train_vq import load_vq_recipe
from pure.vq import VQConfig, VQModel

REPO = Path(__file__).resolve().parents[1]
RECIPES = Path("recipes/pure_tiny")


def _recipe(name: str):
    """``recipes/pure_tiny/NAME.py`` as a module, its folder importable as when it runs as a script."""
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(RECIPES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(RECIPES))
    return module


def test_vq_recipes_are_an_ab_pair_on_the_v2_data():
    gn8, gn32 = load_vq_recipe(RECIPES / "vq_v2.yaml"), load_vq_recipe(RECIPES / "vq_v2_gn32.yaml")
    assert gn8.vq.norm_groups == 8 and gn32.vq.norm_groups == 32
    assert gn8.output_dir != gn32.output_dir
    for recipe in (gn8, gn32):
        assert recipe.data.train == "data/pure_tiny_v2/sources/train" and recipe.data.weight_by_area
        assert recipe.vq.to_vq_config().downsample == 8  # the sequence format's latent grid
    # nothing but the groups and the run folder differ
    a, b = (json.loads(json.dumps(r, default=vars)) for r in (gn8, gn32))
    a["vq"].pop("norm_groups"), b["vq"].pop("norm_groups"), a.pop("output_dir"), b.pop("output_dir")
    assert a == b


def test_decoder_recipe_tunes_the_shipped_tokenizer_on_the_same_data_and_architecture():
    stage1, decoder = load_vq_recipe(RECIPES / "vq_v2.yaml"), load_vq_recipe(RECIPES / "vq_v2_decoder.yaml")
    assert decoder.train.decoder_only and decoder.output_dir != stage1.output_dir
    start = VQModel.from_pretrained(decoder.train.init_from)  # what the shipped model's codes come from
    assert start.config == decoder.vq.to_vq_config() == stage1.vq.to_vq_config()
    assert decoder.data == stage1.data


def test_joint_recipe_trains_the_shipped_tokenizer_on_with_the_same_data_and_architecture():
    stage1, joint = load_vq_recipe(RECIPES / "vq_v2.yaml"), load_vq_recipe(RECIPES / "vq_v2_joint.yaml")
    assert not joint.train.decoder_only and joint.output_dir != stage1.output_dir
    start = VQModel.from_pretrained(joint.train.init_from)
    assert start.config == joint.vq.to_vq_config() == stage1.vq.to_vq_config()
    assert joint.data == stage1.data and joint.train.lr < stage1.train.lr


def test_newcodes_recipe_is_stage4_on_its_own_shards_from_the_script_s_init():
    stage4, newcodes = (load_recipe(RECIPES / f"train_v2_{n}.yaml") for n in ("stage4", "newcodes"))
    script = (RECIPES / "newcodes_v2.sh").read_text()
    assert newcodes.model.init_from == "outputs/pure_tiny_v2/newcodes/init" and "$OUT/init" in script
    assert [(s.name, s.ratio) for s in newcodes.data.sets] == [(s.name, s.ratio) for s in stage4.data.sets]
    for old, new in zip(stage4.data.sets, newcodes.data.sets, strict=True):
        assert new.path == f"{old.path}_newcodes"
        assert f"shards_{old.name}_newcodes" in script.replace("${set}", old.name)  # the script writes them
    assert newcodes.data.image_input_own == stage4.data.image_input_own and newcodes.train == stage4.train
    assert subprocess.run(["bash", "-n", RECIPES / "newcodes_v2.sh"]).returncode == 0


def test_newcodes_continuation_trains_on_from_the_first_run_s_export_on_the_same_data():
    first, more = (load_recipe(RECIPES / f"train_v2_{n}.yaml") for n in ("newcodes", "newcodes2"))
    assert more.model.init_from == f"{first.output_dir}/export" and more.output_dir != first.output_dir
    assert more.data == first.data and more.seed != first.seed  # the same shards, other draws of them
    assert more.train.lr < first.train.lr and 0 < more.train.warmup_steps < more.train.max_steps
    assert more.train.save_every and more.train.export_at_end  # it spans sessions: resumable, then exported
    script = (RECIPES / "newcodes_v2.sh").read_text()  # MORE=1 runs it from the same export the recipe names
    assert "tune train2 recipes/pure_tiny/train_v2_newcodes2.yaml $OUT/train/export" in script


def test_newcodes_from_scratch_gives_the_four_stages_every_shard_set_they_read():
    """SCRATCH=1 links the new shards under the names reproduce_v2.sh reads with SHARDS=given (the names its
    stage recipes use), and starts from the tokenizer the shards were made with."""
    script = (RECIPES / "newcodes_v2.sh").read_text()
    reproduce = (RECIPES / "reproduce_v2.sh").read_text()
    assert "for set in photos scenes scenes2; do ln" in script
    stages = ("train_v2", "train_v2_stage2", "train_v2_stage3", "train_v2_stage4")  # reproduce_v2.sh's
    assert all(f"recipes/pure_tiny/{stage}.yaml" in reproduce for stage in stages)
    needed = {s.path.rsplit("/", 1)[1] for n in stages for s in load_recipe(RECIPES / f"{n}.yaml").data.sets}
    linked = "ln -sfn ../pure_tiny_v2/shards_${set}_newcodes $scratch/shards_$set"
    assert linked in script and needed == {"shards_photos", "shards_scenes", "shards_scenes2"}
    assert all(f"$DATA/{name}" in reproduce for name in needed)  # SHARDS=given checks each one is there
    assert "TOKENIZER=examples/pure-tiny SHARDS=given DATA=$scratch" in script


def test_code_agreement_is_one_for_the_same_tokenizer_and_falls_when_codes_move(tmp_path, capsys):
    module = _recipe("vq_code_agreement")
    torch.manual_seed(0)
    config = VQConfig(
        codebook_size=32, base_channels=32, channel_mult=(1, 1, 1, 2), z_channels=32, num_res_blocks=1
    )
    old = VQModel(config).eval()
    moved = VQModel(config).eval()
    moved.load_state_dict(old.state_dict())
    with torch.no_grad():  # the codebook's rows rolled by one: every position's code index changes
        moved.quantize.embedding.weight.copy_(old.quantize.embedding.weight.roll(1, 0))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    paths = sorted(images.iterdir())
    assert module.agreement(old, old, paths) == (1.0, 2 * 8 * 6)
    assert module.agreement(old, moved, paths)[0] == 0.0
    old.save_pretrained(tmp_path / "old")
    assert module.main([str(tmp_path / "old"), str(tmp_path / "old"), str(images), "--limit", "1"]) == 0
    assert capsys.readouterr().out == f"{images}: 100.0% of 48 codes equal (1 images)\n"
    drawn = tmp_path / "both.png"
    args = [str(tmp_path / "old"), str(tmp_path / "old"), str(images), "--picture", str(drawn)]
    assert module.main([*args, "--picture-images", "2"]) == 0
    single = module.picture(old, old, ("a", "b"), sorted(images.iterdir())[:1])
    assert single.width >= 3 * 48  # the image and both reconstructions side by side
    assert Image.open(drawn).size[0] == single.width and Image.open(drawn).size[1] > single.height  # two rows


def test_train_recipe_reads_both_shard_sets_from_the_v2_init():
    recipe = load_recipe(RECIPES / "train_v2.yaml")
    assert recipe.model.init_from == "outputs/pure_tiny_v2/init"
    assert {s.name for s in recipe.data.sets} == {"photos", "scenes"}
    assert sum(s.ratio for s in recipe.data.sets) == pytest.approx(1.0)
    assert recipe.train.save_every > 0  # a run that spans sessions must be resumable


def test_each_stage_continues_the_one_before_and_stage2_adds_input_noise():
    stages = [load_recipe(RECIPES / f"train_v2{suffix}.yaml") for suffix in ("", "_stage2", "_stage3")]
    stage1, stage2 = stages[:2]
    for before, after in itertools.pairwise(stages):
        assert after.model.init_from == f"{before.run_dir.as_posix()}/export"
    stage4 = load_recipe(RECIPES / "train_v2_stage4.yaml")  # from the committed stage 3: a fresh clone can
    assert (Path(stage4.model.init_from) / "config.json").is_file()  # run stage 4 alone
    stage5 = load_recipe(RECIPES / "train_v2_stage5.yaml")  # the experiment: guidance's context trained too
    assert stage5.model.init_from == "examples/pure-tiny" and 0 < stage5.data.unconditional < 1
    assert stage5.data.sets == stage4.data.sets and stage5.run_dir != stage4.run_dir
    stage6 = load_recipe(RECIPES / "train_v2_stage6.yaml")  # the experiment: more fresh scenes
    assert stage6.model.init_from == "examples/pure-tiny" and stage6.run_dir not in {
        s.run_dir for s in stages
    }
    fresh = {s.path for s in stage6.data.sets} - {s.path for s in [*stage4.data.sets, *stage1.data.sets]}
    assert fresh == {"data/pure_tiny_v2/shards_scenes3"} and sum(s.ratio for s in stage6.data.sets) == 1.0
    stage7 = load_recipe(RECIPES / "train_v2_stage7.yaml")  # stage 6 with two more layers, nothing else
    assert stage7.model.init_from == "outputs/pure_tiny_v2/grown8" and stage7.run_dir != stage6.run_dir
    assert (stage7.data, stage7.train, stage7.seed) == (stage6.data, stage6.train, stage6.seed)
    assert stage1.data.image_input_noise == 0 < stage2.data.image_input_noise < 1
    assert stage2.data.sets == stage1.data.sets and stage2.run_dir != stage1.run_dir


@pytest.mark.parametrize(
    "script", ["data_v2.sh", "vq_v2_curve.sh", "reproduce_v2.sh", "gpu_v2.sh", "stage6.sh", "stage7.sh"]
)
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(RECIPES / script)], capture_output=True).returncode == 0


def test_the_gpu_recipe_checks_for_cuda_and_the_carried_data_before_anything(tmp_path):
    """gpu_v2.sh refuses a machine without CUDA, and reproduce_v2.sh with SHARDS=given refuses missing
    shards, each in one line, before anything is made (the dry run on real shards is in the README)."""
    env = {**os.environ, "PY": sys.executable, "RUN": str(tmp_path / "run"), "DATA": str(tmp_path / "data")}

    def run(script: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
        command = ["bash", str(RECIPES / script), *args]
        return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True)

    if not torch.cuda.is_available():
        no_cuda = run("gpu_v2.sh", str(tmp_path / "out"))
        assert no_cuda.returncode == 2
        assert no_cuda.stderr.strip() == "error: no CUDA device (CPU=1 runs it on the CPU anyway)"
    given = run("reproduce_v2.sh", SHARDS="given")
    assert given.returncode == 2
    assert given.stderr.strip() == f"error: SHARDS=given but {tmp_path / 'data'}/shards_photos is missing"
    assert list(tmp_path.iterdir()) == []


def test_another_data_folder_is_what_every_stage_trains_on(tmp_path):
    """reproduce_v2.sh with DATA=elsewhere and SHARDS=given: each stage's trainer gets a copy of its recipe
    whose shard paths (and only those) point into DATA, not data/pure_tiny_v2 (run with a stand-in Python
    that logs its arguments and makes the folders the script reads next)."""
    data, run, log = tmp_path / "data", tmp_path / "run", tmp_path / "calls.jsonl"
    for need in ("shards_photos", "shards_scenes", "shards_scenes2", "sources/holdout"):
        (data / need).mkdir(parents=True)
    (data / "sources/captions.jsonl").write_text("")
    stub = tmp_path / "python"
    stub.write_text(
        f"#!{sys.executable}\nimport json, pathlib, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "for arg in sys.argv:\n"
        "    if arg.startswith('output_dir='):\n"
        "        pathlib.Path(arg[len('output_dir='):], 'export').mkdir(parents=True)\n"
    )
    stub.chmod(0o755)
    env = {**os.environ, "PY": str(stub), "RUN": str(run), "DATA": str(data), "SHARDS": "given", "VQ": "vq"}
    subprocess.run(["bash", str(RECIPES / "reproduce_v2.sh")], env=env, capture_output=True, text=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    trained = [call[2] for call in calls if call[:2] == ["-m", "pure.train"]]
    names = ["train_v2.yaml", "train_v2_stage2.yaml", "train_v2_stage3.yaml", "train_v2_stage4.yaml"]
    assert trained == [str(run / "recipes" / name) for name in names]
    for name in names:
        original, copy = load_recipe(RECIPES / name), load_recipe(run / "recipes" / name)
        assert [s.path for s in copy.data.sets] == [
            s.path.replace("data/pure_tiny_v2/", f"{data}/") for s in original.data.sets
        ]
        assert all(s.path.startswith(f"{data}/shards_") for s in copy.data.sets)
        copy.data.sets = original.data.sets
        assert copy == original


def _load_curve():
    spec = importlib.util.spec_from_file_location("vq_curve", RECIPES / "vq_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curve_point_measures_bicubic_vq_and_copy(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    config = VQConfig(
        codebook_size=32, base_channels=32, channel_mult=(1, 1, 1, 2), z_channels=32, num_res_blocks=1
    )
    VQModel(config).save_pretrained(run / "vq")
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(holdout / "a.png")
    curve = _load_curve()
    for step in (10, 20):
        (run / "metrics.json").write_text(json.dumps({"step": step, "seconds": step * 1.5}))
        assert curve.main([str(run), str(holdout), "--crop", "64", "--crops-per-image", "1"]) == 0
    points = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [10, 20]
    assert set(points[0]) == {"step", "seconds", "bicubic", "vq", "copy"}
    assert points[0]["vq"]["token_acc"] == 1.0 and "token_acc" not in points[0]["bicubic"]
    assert points[0]["bicubic"] == points[1]["bicubic"]  # same protocol, same LQs
    assert (run / "curve.png").stat().st_size > 0


def test_the_committed_v2_tokenizer_reproduces_its_last_curve_point(tmp_path):
    """examples/pure-tiny-v2/vq is the tokenizer whose curve the README quotes: rebuilt from the recipe's
    sources and seeds, the hold-out gives its last point again (bicubic, VQ ceiling, copy), and its ceiling
    is above bicubic in PSNR-Y, SSIM-Y and GMS-Y (the issue's tokenizer target)."""
    from pure.data.sample_images import build_sources
    from pure.data.synthetic_images import write_scenes
    from pure.eval.holdout import VQOnly, measure_holdout
    from pure.imageio import list_images

    sources = tmp_path / "sources"
    build_sources(RECIPES / "sources.yaml", sources)  # as recipes/pure_tiny/data_v2.sh does
    write_scenes(sources, "holdout", range(16), size=128)
    vq = VQModel.from_pretrained("examples/pure-tiny-v2/vq")
    with torch.inference_mode():
        results = measure_holdout(
            VQOnly(vq, 128),
            list_images(sources / "holdout"),
            crop=128,
            crops_per_image=4,
            seeds=[0],
            methods=["bicubic", "vq", "copy"],
        )
    curve = Path("examples/pure-tiny-v2/vq_curve_v2_1500.jsonl").read_text().splitlines()
    last = json.loads(curve[-1])
    assert last["step"] == 1500
    for method in ("bicubic", "vq", "copy"):
        for key in ("psnr_y", "ssim_y", "gms_y"):
            assert results["methods"][method][key]["mean"] == pytest.approx(last[method][key], abs=0.02)
    for key in ("psnr_y", "ssim_y", "gms_y"):
        assert last["vq"][key] > last["bicubic"][key]


@pytest.mark.parametrize("template", ["card_template.md", "card_template_v2.md"])
def test_card_templates_take_the_fields_ship_py_reads(tmp_path, template):
    spec = importlib.util.spec_from_file_location("ship", RECIPES / "ship.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    run = tmp_path / "run"
    (run / "holdout").mkdir(parents=True)
    holdout = {"psnr": 19.5, "psnr_y": 23.9, "usage": 0.87}
    vq_metrics = tmp_path / "committed_vq" / "metrics.json"  # a tokenizer the run did not train
    vq_metrics.parent.mkdir()
    vq_metrics.write_text(json.dumps({"holdout": holdout, "steps": 1500, "seconds": 2817}))
    config = {"hidden_size": 256, "num_hidden_layers": 6, "vocab_size": 1400, "pure_image_size": 128}
    sets = [
        {"path": "shards_photos", "ratio": 0.35, "name": "photos"},
        {"path": "shards_scenes", "ratio": 0.65},
    ]
    fresh = [{"path": "shards_scenes2", "ratio": 1.0, "name": "scenes2"}]
    stages = (
        ("train", 1200, {"image_input_noise": 0, "sets": sets}, 2.5),
        ("train2", 1500, {"image_input_noise": 0.3, "sets": sets}, 2.3),
        ("train3", 300, {"image_input_noise": 0.2, "image_input_own": 0.4, "sets": fresh}, 2.2),
    )
    for stage, steps, data, loss in stages:
        export = run / stage / "export"
        export.mkdir(parents=True)
        (export / "trainer_state.json").write_text(json.dumps({"step": steps, "train_seconds": 60 * steps}))
        (run / stage / "metrics.jsonl").write_text(json.dumps({"step": steps, "loss": loss}) + "\n")
        (export / "config.json").write_text(json.dumps(config))
        recipe = {"train": {"global_batch_size": 8, "lr": 1e-3}, "data": data}
        (export / "training_config.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    (run / "holdout" / "results.md").write_text("# Held-out measurement\n| method | PSNR-Y |\n")
    fields = {**ship.card_fields(run, ("train", "train2", "train3"), vq_metrics), "pictures": "![p](p.png)"}
    assert fields["steps"] == 3000 and fields["train_minutes"] == 3000 and fields["loss"] == 2.2
    assert (
        "stage 2: 1500 steps at peak lr 0.001, 30% of the HQ image inputs replaced, 1500 min"
        in fields["stages"]
    )
    assert "stage 1: 1200 steps at peak lr 0.001, 1200 min; stage 2" in fields["stages"]
    assert (
        "stage 3: 300 steps at peak lr 0.001, 20% of the HQ image inputs replaced by random codes and 40% "
        "by its own samples (data: scenes2 100%), 300 min" in fields["stages"]
    )
    card = (RECIPES / template).read_text().format(**fields)
    assert "3000 steps of 8 sequences" in card and "| method | PSNR-Y |" in card and "{" not in card


def test_exposure_diagnosis_measures_forced_free_copy_and_attention(tiny_checkpoint, tmp_path):
    from pure.data.shards import find_shards, read_shard
    from pure.model import load_config
    from pure.sequence import SequenceFormat
    from pure.tokenizer import PureTokenizer
    from pure.train.synthetic import write_synthetic_shards

    spec = importlib.util.spec_from_file_location("exposure", RECIPES / "exposure.py")
    exposure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exposure)
    shards = write_synthetic_shards(tiny_checkpoint, tmp_path / "shards", n=3, per_shard=3)
    d = exposure.diagnose(str(tiny_checkpoint), str(shards), n=3, free=2)
    assert len(d["teacher_forced"]) == len(d["copy"]) == 3 and len(d["free_running"]) == 2
    assert all(0 <= x <= 1 for x in d["teacher_forced"] + d["free_running"])
    # copy accuracy, another way: the two image blocks parsed, compared code by code
    config = load_config(tiny_checkpoint)
    tokenizer = PureTokenizer.from_checkpoint(tiny_checkpoint)  # config.json read by the helper
    fmt = SequenceFormat(tokenizer)
    rows = read_shard(find_shards(shards)[-1]).to_pylist()
    for row, copy in zip(rows, d["copy"], strict=True):
        ids = torch.tensor(row["input_ids"])
        boi = (ids == fmt.vocab.boi).nonzero().flatten().tolist()
        lq, hq = (fmt.parse_image_block(ids[i:]) for i in boi)
        assert copy == pytest.approx((lq == hq).float().mean().item())
    assert d["attention"].shape == (config.num_hidden_layers, config.num_attention_heads)
    assert ((d["attention"] >= 0) & (d["attention"] <= 1)).all()


def _load_probe():
    spec = importlib.util.spec_from_file_location("perceive_probe", RECIPES / "perceive_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_perceive_probe_statistics_see_noise_and_blur():
    probe = _load_probe()
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 1, generator=g) * torch.linspace(-0.5, 0.5, 64)[None, None]  # smooth ramps
    noisy = base + 0.1 * torch.randn(3, 64, 64, generator=g)
    blurred = torch.nn.functional.avg_pool2d(noisy[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    f_base, f_noisy, f_blurred = (probe.statistics(x) for x in (base.expand(3, 64, 64), noisy, blurred))
    assert f_base.shape == (12,) and torch.isfinite(f_base).all()
    high_pass = [0, 3]  # luma's 3x3 and 2x2 high-pass
    assert (f_noisy[high_pass] > f_base[high_pass] + 1).all()  # noise raises them by e-fold and more
    assert (f_blurred[high_pass] < f_noisy[high_pass]).all()  # blurring lowers them


def test_perceive_probe_fits_separable_labels_and_not_random_ones():
    probe = _load_probe()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    separable = (x @ torch.randn(5, 3, generator=g)).argmax(-1)  # 3 classes, linearly separable
    train = torch.arange(400) < 300
    predicted = probe.fit_probe(x, separable, train, classes=3, l2=1e-4)
    assert (predicted == separable[~train]).float().mean() > 0.9
    random_labels = torch.randint(0, 3, (400,), generator=g)
    predicted = probe.fit_probe(x, random_labels, train, classes=3, l2=1e-4)
    assert (predicted == random_labels[~train]).float().mean() < 0.5


# The GPU machine takes the tree (tracked files; a link as a link) and what a call carries, 64 MiB together;
# gpu_v2.sh carries PURE-tiny's data in an 11 MB bundle. A 17 MB model or VQ copy more would stop it.
TRAVEL_LIMIT_MIB, GPU_V2_CARRY_MIB = 64, 12


def test_the_tree_leaves_room_on_the_way_to_the_gpu_machine_for_the_data_gpu_v2_carries():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    paths = [REPO / name for name in listed.stdout.decode().split("\0") if name]
    tree_mib = sum(os.lstat(p).st_size for p in paths if os.path.lexists(p)) / 2**20
    assert tree_mib < TRAVEL_LIMIT_MIB - GPU_V2_CARRY_MIB, (
        f"the tracked tree is {tree_mib:.1f} MiB: with gpu_v2.sh's data it no longer travels to the GPU "
        "machine; link copies of the same weights (examples/pure-tiny-v2/vq) or drop old models"
    )
    links = [p for p in paths if p.is_symlink()]
    assert {p.relative_to(REPO).as_posix() for p in links} >= {"examples/pure-tiny-v2/vq/model.safetensors"}
    assert all(p.resolve().is_file() and REPO in p.resolve().parents for p in links)  # inside the tree


def test_choose_sampling_pairs_every_setting_with_copy_and_bicubic():
    spec = importlib.util.spec_from_file_location("choose_sampling", RECIPES / "choose_sampling.py")
    choose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choose)

    def row(method, crop, psnr, acc=None):
        extra = {} if acc is None else {"token_acc": acc}
        return {
            "method": method,
            "crop": crop,
            "seed": 0,
            "psnr_y": psnr,
            "ssim_y": 0.5,
            "gms_y": 0.5,
            **extra,
        }

    rows = [row("bicubic", c, 20.0) for c in "abcd"] + [row("copy", c, 19.0, 0.2) for c in "abcd"]
    rows += [row("pure-greedy", c, 19.0 + d, 0.3) for c, d in zip("abcd", (1.0, 1.2, 0.9, 1.1), strict=True)]
    text = choose.table({"methods": {"bicubic": {}, "copy": {}, "pure-greedy": {}}, "rows": rows})

    lines = text.splitlines()
    assert len(lines) == 2 + 2  # header, rule, the setting minus copy and minus bicubic
    assert lines[2].startswith("| pure-greedy | copy | +1.05 ± 0.065 (better) | +0 ± 0 |")
    assert lines[2].endswith("| +0.1 ± 0 (better) |")
    assert lines[3].startswith("| pure-greedy | bicubic | +0.05 ± 0.065 |") and lines[3].endswith("| - |")


def test_grow_adds_layers_that_change_nothing_until_trained(tiny_checkpoint, tmp_path):
    """stage 7's deeper model starts as the shipped one: every logit the same, two more layers to train."""
    from pure.model import load_config, load_model

    spec = importlib.util.spec_from_file_location("grow", RECIPES / "grow.py")
    grow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grow)
    layers = load_config(tiny_checkpoint).num_hidden_layers
    out = tmp_path / "grown"
    assert grow.main(["--model", str(tiny_checkpoint), "--after", f"0,{layers - 1}", "--out", str(out)]) == 0
    before, after = (load_model(p).eval() for p in (tiny_checkpoint, out))
    assert after.config.num_hidden_layers == layers + 2
    ids = torch.randint(0, before.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(after(input_ids=ids).logits, before(input_ids=ids).logits)
    new = after.model.layers[1]  # the copy of layer 0: its inputs' weights kept, its outputs' zero
    assert not new.mlp.down_proj.weight.any() and not new.self_attn.o_proj.weight.any()
    torch.testing.assert_close(new.mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
    vq = sorted(p.relative_to(tiny_checkpoint) for p in (tiny_checkpoint / "vq").rglob("*"))
    assert vq and vq == sorted(p.relative_to(out) for p in (out / "vq").rglob("*"))  # its weights too
    assert not (out / "README.md").exists()  # the card is the original's
    assert grow.main(["--model", str(tiny_checkpoint), "--after", "0", "--out", str(out)]) == 2  # exists
    halves = grow.grow_state(before.state_dict(), layers, [0], share=0.5)  # the split: full-size copies
    for name in grow.OUTPUTS:
        a, b = halves[f"model.layers.0.{name}"], halves[f"model.layers.1.{name}"]
        torch.testing.assert_close(a + b, before.state_dict()[f"model.layers.0.{name}"])
        torch.testing.assert_close(a, b)
    past = ["--model", str(tiny_checkpoint), "--after", str(layers), "--out", str(tmp_path / "x")]
    assert grow.main(past) == 2 and not (tmp_path / "x").exists()  # no such layer: nothing written


def test_remap_carries_each_code_s_rows_to_the_new_code_at_its_positions(tiny_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    from pure.tokenizer import PureTokenizer

    remap = _recipe("remap_codes")
    old = VQModel.from_pretrained(tiny_checkpoint / "vq").eval()
    with torch.no_grad():  # the codebook rolled by one row: where old code i was, new code i + 1 is
        old.quantize.embedding.weight.copy_(old.quantize.embedding.weight.roll(1, 0))
    old.save_pretrained(tmp_path / "new_vq")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "remapped"
    args = ["--model", str(tiny_checkpoint), "--vq", str(tmp_path / "new_vq"), "--out", str(out)]
    assert remap.main([*args, "--fit", str(images), "--check", str(images)]) == 0
    assert "0.0% codes equal, 100.0% recovered by the map" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # never over an existing folder
        remap.main([*args, "--fit", str(images)])
    original = VQModel.from_pretrained(tiny_checkpoint / "vq").eval()
    seen = torch.unique(remap.code_pairs(original, old, sorted(images.iterdir()))[0])
    size = old.config.codebook_size
    code_to_id = PureTokenizer.from_checkpoint(tiny_checkpoint).vocab.code_to_id
    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after) and sorted((out / "vq").iterdir()) != []
    for name in remap.ROWS:
        moved = code_to_id[(seen + 1) % size]
        assert torch.equal(after[name][moved], before[name][code_to_id[seen]])
        untouched = torch.ones(len(before[name]), dtype=torch.bool)
        untouched[moved] = False
        assert torch.equal(after[name][untouched], before[name][untouched])  # text rows, unseen codes
    assert all(torch.equal(before[k], after[k]) for k in before if k not in remap.ROWS)


def test_remap_transition_normalises_counts_and_keeps_unseen_codes():
    remap = _recipe("remap_codes")
    counts = remap.co_occurrence(torch.tensor([0, 0, 1, 2]), torch.tensor([1, 1, 1, 0]), size=3)
    assert counts.tolist() == [[0, 0, 1], [2, 1, 0], [0, 0, 0]]  # row: new code, column: old code
    assert remap.transition(counts).tolist() == [[0, 0, 1], [2 / 3, 1 / 3, 0], [0, 0, 1]]
