"""Shared fixtures: everything is built here, tiny and random; nothing is downloaded."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from cli_run import CliRun


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint folder (model, tokenizer, vq/) as `python -m pure.infer --model` takes."""
    from pure.make_random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_restorer(tiny_checkpoint):
    from pure.restorer import PureRestorer

    return PureRestorer.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tiny_format(tiny_restorer):
    return tiny_restorer.format


@pytest.fixture(scope="session")
def tiny_vocab(tiny_restorer):
    return tiny_restorer.tokenizer.vocab


@pytest.fixture
def cpu_generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def cli(capsys, tiny_checkpoint):
    """``cli(*argv)``: run ``pure.infer.main`` in-process on the tiny checkpoint at 64 px, its text cut at 32
    tokens (the random model never ends it; argv can override all three), returning its exit code and
    captured output."""
    from pure import infer

    def run(*args: str) -> CliRun:
        capsys.readouterr()  # drop anything printed before
        try:
            defaults = ["--model", str(tiny_checkpoint), "--size", "64", "--max-text-tokens", "32", "--quiet"]
            code = infer.main([*defaults, *args])
        except SystemExit as exit_:  # argparse: --help, bad option syntax
            code = exit_.code
        captured = capsys.readouterr()
        result = CliRun(code, captured.out, captured.err)
        assert "Traceback" not in result.stderr
        return result

    return run


@pytest.fixture(scope="session")
def sharp_model(tiny_restorer):
    """The tiny model with its head scaled up: peaked, prefix-dependent distributions (a random tiny
    model's are nearly uniform and nearly independent of the prefix, which would make the test blind)."""
    model = copy.deepcopy(tiny_restorer.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model
