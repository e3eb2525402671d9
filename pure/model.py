"""The backbone: transformers' native Chameleon, wrapped (not vendored) so that it can restore images.

:class:`PureForConditionalGeneration` differs from ``ChameleonForConditionalGeneration`` in three ways:

* it never masks image-token logits (upstream sets them to the dtype minimum, which makes image
  generation sample uniform noise);
* it returns fp32 logits (guidance, entropy and top-k need them), for the positions asked for only;
* it has no Chameleon VQGAN: PURE tokenises images with the LlamaGen VQ (:mod:`pure.vq`).

It adds :meth:`~PureForConditionalGeneration.decode`, the same layers without the per-call wrapping,
for :mod:`pure.decoding.loop`'s decode loop.

:func:`load_model` reads PURE / Lumina-mGPT checkpoints (a local folder or a Hub id) shard by shard,
expanding their ``[1, head_dim]`` QK-norm tensors to transformers' ``[heads, head_dim]``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.chameleon.modeling_chameleon import ChameleonRotaryEmbedding

from pure.decoding.attention import decoding_attention, layer_kwargs
from pure.decoding.config import SAMPLING_FILE

HUB_MODEL_ID = "nonwhy/PURE"
_QK_NORM_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.([qk])_norm\.(weight|bias)$")
_IGNORED_KEYS = re.compile(r"model\.vqmodel\.|.*rotary_emb\.inv_freq$")
# what a Hub checkpoint is downloaded with: weights, tokenizers and the decoding defaults (sampling.json)
_WEIGHT_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    SAMPLING_FILE,
    "vq/*",
]


class ModelLoadError(RuntimeError):
    """A checkpoint could not be found or read; the message says how to get it."""


class PureForConditionalGeneration(ChameleonForConditionalGeneration):
    """Chameleon decoder + LM head that can emit image tokens (see module docstring)."""

    def __init__(self, config: ChameleonConfig):
        super().__init__(config)
        self.model.vqmodel = None  # never used: the LlamaGen VQ lives outside the LM

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Like upstream's forward, minus the image-logit mask, with fp32 logits.

        ``logits_to_keep``: an int ``n`` keeps the last ``n`` positions (0 = all), a 1-D tensor keeps
        those positions. ``labels`` give the usual shifted cross-entropy (``-100`` ignored).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden).float()  # (B, T_kept, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    def decode(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        past_key_values,
        logits_to_keep: int = 1,
        head: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` for a decode loop: the same layers on the same inputs -> fp32 logits (B, keep, V).

        ``head``: rows of the LM head's weight (``(V', hidden)``, e.g. the image codes' rows) to compute the
        logits of those ids only, ``(B, keep, V')``. ``rotary``: :meth:`rotary_tables` covering every
        position: the positions' rotary embeddings are looked up rather than computed (the same values).

        The attention is :func:`pure.decoding.attention.decode_attention` whatever the model was loaded with
        (flash-attention 2 cannot take a static cache's mask): it reads only the cache slots the mask spans.
        ``attention_mask``: boolean ``(B, 1, q, slots)``, which of the cache's first ``slots`` slots each
        query sees; a loop that keeps it up to date skips, per call, transformers' mask building over the
        whole cache, its output capturing and its output dataclasses (about a quarter of a small model's
        forward on a CPU). A 2-D mask goes through transformers' mask builder, as in :meth:`forward`.
        """
        with decoding_attention(self):
            return self._decode(
                input_ids, position_ids, attention_mask, past_key_values, logits_to_keep, head, rotary
            )

    def _decode(self, input_ids, position_ids, attention_mask, past_key_values, logits_to_keep, head, rotary):
        hidden = self.model.embed_tokens(input_ids)
        if attention_mask.ndim == 2:
            attention_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
            )
        if rotary is None:
            position_embeddings = self.model.rotary_emb(hidden, position_ids=position_ids)
        else:
            position_embeddings = (rotary[0][position_ids], rotary[1][position_ids])
        attention_kwargs = layer_kwargs(attention_mask)  # the same for every layer: made once
        for layer in self.model.layers:
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=True,
                position_embeddings=position_embeddings,
                **attention_kwargs,
            )[0]
        hidden = self.model.norm(hidden[:, -logits_to_keep:])  # the norm is per position: kept ones only
        logits = self.lm_head(hidden) if head is None else torch.nn.functional.linear(hidden, head)
        return logits.float()

    def rotary_tables(
        self, length: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)``, each ``(length, head_dim)``: the rotary embeddings of positions ``0 .. length - 1``
        as the model computes them (in its dtype), for :meth:`decode` to look up. ``None`` when the model's
        rotary embedding depends on more than the position (a dynamic RoPE variant)."""
        rotary = self.model.rotary_emb
        if getattr(rotary, "rope_type", "default") != "default":
            return None
        x = torch.zeros((), dtype=self.dtype, device=device)  # gives the device and dtype only
        cos, sin = rotary(x, torch.arange(length, device=device)[None])
        return cos[0], sin[0]


def default_attn_implementation(device: torch.device | str, dtype: torch.dtype) -> str:
    """flash-attention 2 on CUDA in half precision when it is installed, else PyTorch's sdpa. (Training's
    choice: decoding runs its own attention whatever this is: :meth:`PureForConditionalGeneration.decode`.)"""
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is, else a Hub id downloaded (or found in the cache when ``HF_HUB_OFFLINE=1``).

    A name that looks like a path and is no folder fails as such, never as a Hub lookup: one that starts
    with ``.``, ``/`` or ``~``, whose parent folder exists (``examples/tiny-random``), or not ``owner/name``.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{name} is not a checkpoint folder but a file; give its folder or a Hub id")
    hub_id = re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", name) is not None
    if not hub_id or name.startswith((".", "/", "~")) or path.parent.is_dir():
        raise ModelLoadError(
            f"{name} is not a checkpoint folder: no such folder (`python -m pure.make_random_checkpoint "
            f"{name}` makes a tiny random one to try the code; a Hub id looks like {HUB_MODEL_ID})"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=_WEIGHT_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        how = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "the Hub could not be reached or the repo does not exist"
        )
        raise ModelLoadError(
            f"cannot get {name_or_path}: {how}. Download it on a machine with network "
            f"(`hf download {name_or_path} --local-dir DIR`) and pass --model DIR"
        ) from err


def load_config(folder: str | os.PathLike) -> ChameleonConfig:
    """``config.json`` of a checkpoint folder. Lumina/PURE-only keys (``mask_image_logits``, ``dropout``,
    ``z_loss_weight``, ``lora_*``) are kept as attributes; legacy ``rope_theta`` is converted."""
    if not (Path(folder) / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {folder}")
    return ChameleonConfig.from_pretrained(folder)


def _state_dict_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            return sorted({folder / name for name in json.load(f)["weight_map"].values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def convert_key(key: str, tensor: torch.Tensor, config: ChameleonConfig) -> torch.Tensor:
    """PURE/Lumina store QK-norm weight/bias as ``[1, head_dim]`` (one model-parallel shard);
    transformers wants one row per head. Numerically identical after the expansion."""
    match = _QK_NORM_KEY.match(key)
    if match and tensor.shape[0] == 1:
        heads = config.num_attention_heads if match.group(1) == "q" else config.num_key_value_heads
        return tensor.expand(heads, -1).contiguous()
    return tensor


def load_model(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    quantize: str | None = None,
) -> PureForConditionalGeneration:
    """Load a PURE/Lumina-mGPT checkpoint strictly (every weight used; none missing but Chameleon's VQ).

    The model is built on the meta device and its tensors are assigned shard by shard, so peak memory
    is one copy of the weights. ``quantize``: ``"int8"`` or ``"int4"`` weight-only quantisation of the
    decoder layers' linears (:mod:`pure.quant`, needs torchao): the weights are read onto the CPU and each
    linear is quantised on ``device``, so the device never holds the unquantised decoder.
    """
    if quantize is not None:
        from pure.quant import check_quantize

        check_quantize(quantize)
    load_device = "cpu" if quantize is not None else device  # quantize_model moves it, linear by linear
    folder = resolve_checkpoint(name_or_path)
    config = load_config(folder)
    config._attn_implementation = attn_implementation or default_attn_implementation(device, dtype)
    with torch.device("meta"):
        model = PureForConditionalGeneration(config)
    expected = set(model.state_dict())

    state_dict = {}
    for file in _state_dict_files(folder):
        with safe_open(file, framework="pt", device=str(load_device)) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if _IGNORED_KEYS.match(key):
                    continue
                state_dict[key] = convert_key(key, f.get_tensor(key), config).to(dtype)
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint {folder} does not match the Chameleon architecture of its config.json: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Non-persistent buffers were created on the meta device: rebuild them for real.
    model.model.rotary_emb = ChameleonRotaryEmbedding(config).to(load_device)
    model.eval().requires_grad_(False)
    if quantize is not None:
        from pure.quant import quantize_model

        quantize_model(model, quantize, device)
    return model
