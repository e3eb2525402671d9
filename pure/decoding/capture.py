"""Capturing the image step: CUDA graphs on CUDA, any ``torch.compile`` backend elsewhere, and the care both
need (outputs a replay overwrites, inputs it would copy, clocks that must wait for the device)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def uses_cuda_graphs(compile: bool | str, device: torch.device) -> bool:
    """``compile=True`` captures the image step in CUDA graphs on CUDA (elsewhere it is a no-op)."""
    return compile is True and device.type == "cuda"


def capture_cuda_graphs(fn: Callable) -> Callable:
    """``fn`` compiled for CUDA-graph replay. A replay writes its outputs into the same memory as the previous
    replay: see :func:`owning_outputs`."""
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)


def owning_outputs(step: Callable) -> Callable:
    """A CUDA-graph step whose outputs the caller owns: each call tells cudagraph trees that a new step
    begins (the previous replay's outputs may be overwritten) and copies the new outputs out, so that a
    loop can carry them into the next call (Jacobi's drafts and their distributions do)."""

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = step(*args)
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)

    return call


def allowing_shapes(step: Callable, shapes: int) -> Callable:
    """A compiled ``step`` that takes inputs of ``shapes`` shapes: dynamo keeps one compilation per shape (and
    per cache capacity) and stops at ``torch._dynamo.config.recompile_limit`` (``fullgraph=True``: with an
    error), so each call raises the limit ``shapes``-fold, the same allowance per shape as a step of one."""

    def call(*args):
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit * shapes):
            return step(*args)

    return call


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures the work (CUDA runs
    asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_compile(compile: bool | str) -> None:
    """Refuse a ``compile`` setting that is neither a bool nor a ``torch.compile`` backend's name, now
    rather than at the first image."""
    if isinstance(compile, bool):
        return
    backends = torch.compiler.list_backends(exclude_tags=())
    if compile not in backends:
        raise ValueError(
            f"compile must be True, False or a torch.compile backend ({', '.join(backends)}); got {compile!r}"
        )


def mark_static(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` marked as static inputs: a CUDA-graph replay reads them where they are instead of copying
    them into its own memory first."""
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t)
    return tensors
