"""The training loss: cross-entropy on the supervised positions only, with the LM head evaluated there only.

Labels follow transformers' convention (unshifted, ``-100`` = no loss): the logit at position ``t``
predicts ``labels[t + 1]``. Only the answer is supervised (spec 1.7), roughly half of an 8.5k-token
sequence, so the head runs on those hidden states alone: the full fp32 logits of an 11,776-token
sequence at V = 73,728 would be 3.2 GiB (plus as much for their gradient).

The cross-entropy is a token mean over the batch (PURE's: every supervised token weighs the same,
whatever its sequence), computed in fp32. It splits exactly into a text part (answer text and the final
``<eot>``) and an image part (the HQ block from ``<boi>`` to ``<eoi>``): ``ce == text + image``.
The optional z-loss, ``logsumexp(logits)**2`` averaged over the same positions, uses the logits that
predict supervised labels (PURE's copy evaluates it one position off; harmless there at weight 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pure.sequence import IGNORE_INDEX


class LossOutput(NamedTuple):
    """What one forward returns. Sums are over the supervised tokens of this micro-batch.

    ``loss`` = ``ce`` + ``z_loss_weight * z_loss``, the value to back-propagate. (A named tuple, so that
    DeepSpeed's ZeRO-3 hooks can see its tensors.)
    """

    loss: torch.Tensor
    ce: torch.Tensor
    z_loss: torch.Tensor
    text_ce_sum: torch.Tensor
    image_ce_sum: torch.Tensor
    n_text: torch.Tensor
    n_image: torch.Tensor

    @property
    def n_tokens(self) -> torch.Tensor:
        return self.n_text + self.n_image

    @property
    def text_part(self) -> torch.Tensor:
        """The text tokens' share of ``ce`` (``text_part + image_part == ce``)."""
        return self.text_ce_sum / self.n_tokens.clamp(min=1)

    @property
    def image_part(self) -> torch.Tensor:
        return self.image_ce_sum / self.n_tokens.clamp(min=1)


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, selected)``: ``targets[b, t] = labels[b, t + 1]``, ``selected`` where it is supervised.

    Shapes ``(B, T-1)``; position ``t`` of the hidden states / logits predicts ``targets[:, t]``.
    """
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def _head_ce(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position fp32 cross-entropy and log-partition for hidden ``(N, H)`` and targets ``(N,)``."""
    logits = lm_head(hidden).float()  # (N, V)
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
    return ce, lse


def supervised_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    z_loss_weight: float = 0.0,
    chunk_size: int = 0,
) -> LossOutput:
    """Loss from the backbone's final hidden states.

    Args:
        hidden: ``(B, T, H)`` final (normed) hidden states.
        lm_head: the output projection, called on the selected positions only (a module call, so that
            ZeRO-3 gathers its weight).
        labels: ``(B, T)`` unshifted labels, ``-100`` where there is no loss.
        image_mask: ``(B, T)`` bool, True where a label belongs to the answer's image block; None = all
            supervised tokens count as text.
        chunk_size: evaluate the head on this many positions at a time, recomputing each chunk's logits
            in backward (bounds the logits memory to ``chunk_size x V``); 0 = one chunk.
    """
    targets, selected = shifted_targets(labels)  # (B, T-1)
    h = hidden[:, :-1][selected]  # (N, H)
    y = targets[selected]  # (N,)
    if chunk_size and h.shape[0] > chunk_size:
        parts = [
            checkpoint(_head_ce, lm_head, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
            for i in range(0, h.shape[0], chunk_size)
        ]
        ce, lse = (torch.cat(t) for t in zip(*parts, strict=True))
    else:
        ce, lse = _head_ce(lm_head, h, y)  # (N,), (N,)
    no_image = torch.zeros_like(y, dtype=torch.bool)
    is_image = no_image if image_mask is None else image_mask[:, 1:][selected]  # (N,)
    n = torch.tensor(ce.numel(), device=ce.device)
    denominator = n.clamp(min=1)
    ce_mean = ce.sum() / denominator
    z_loss = lse.pow(2).sum() / denominator
    loss = ce_mean + z_loss_weight * z_loss if z_loss_weight else ce_mean
    return LossOutput(
        loss=loss,
        ce=ce_mean,
        z_loss=z_loss.detach(),
        text_ce_sum=ce[~is_image].sum().detach(),
        image_ce_sum=ce[is_image].sum().detach(),
        n_text=(~is_image).sum(),
        n_image=is_image.sum(),
    )


def backbone_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(ChameleonModel, lm_head)`` of a PURE model, also through a peft wrapper."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.model, base.lm_head


class SupervisedLMLoss(nn.Module):
    """The module DeepSpeed trains: a PURE LM (or its peft wrapper) whose forward returns the loss.

    ``forward(input_ids, labels, image_mask)`` with ``(B, T)`` tensors; right padding needs no attention
    mask (a causal model's real positions never see later padding), which keeps the fused causal
    attention kernels.
    """

    def __init__(self, lm: nn.Module, z_loss_weight: float = 0.0, chunk_size: int = 0):
        super().__init__()
        self.lm = lm
        self.z_loss_weight = z_loss_weight
        self.chunk_size = chunk_size

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> LossOutput:
        backbone, head = backbone_and_head(self.lm)
        hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
        return supervised_loss(hidden, head, labels, image_mask, self.z_loss_weight, self.chunk_size)

    @torch.no_grad()
    def own_samples(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        code_ids: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """What the model would have fed itself at ``positions`` (``(B, T)`` bool, never column 0): one
        sample per position of its next-token distribution over ``code_ids`` (the image codes), from a
        teacher-forced pass on ``input_ids``; drawn with the CPU ``generator``. Returns ``(positions.sum(),)``
        ids, in ``input_ids[positions]`` order."""
        if positions[:, 0].any():
            raise ValueError("position 0 has no previous token to predict it from")
        backbone, head = backbone_and_head(self.lm)
        hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][positions[:, 1:].to(hidden.device)])[:, code_ids.to(hidden.device)]
        probs = logits.float().softmax(-1).cpu()
        return code_ids.cpu()[torch.multinomial(probs, 1, generator=generator).squeeze(1)]


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference: the usual shifted CE over full ``(B, T, V)`` logits (token mean). For tests."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
