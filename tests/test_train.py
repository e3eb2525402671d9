"""Tests for pure.train: recipe config, data order, loss masking, dropout, LoRA, DeepSpeed runs, export.

In-process tests use the tiny random checkpoint with plain PyTorch optimisers. The DeepSpeed tests run
``python -m pure.train`` in subprocesses (single process, gloo on CPU): one shared set of short runs
(uninterrupted, halted + resumed, LoRA) serves the smoke, resume, LoRA and export tests. The first
DeepSpeed run on a machine compiles a small op into ``TORCH_EXTENSIONS_DIR`` (kept in
``~/.cache/pure/torch_extensions`` unless set), so later runs skip it.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("peft", reason="needs the train extra: pip install -e '.[train]'")

from pure.data.shards import ShardSet
from pure.model import load_model
from pure.sequence import IGNORE_INDEX, SequenceFormat
from pure.train.config import ConfigError, Recipe, apply_override, load_recipe, recipe_to_yaml
from pure.train.data import (
    UNCONDITIONAL_STREAM,
    PaddingCollator,
    TrainingData,
    epoch_plan,
    input_noise_generator,
    replace_image_inputs,
    unconditional_rows,
)
from pure.train.engine import (
    DistInfo,
    PlainEngine,
    build_optimizer,
    deepspeed_config,
    learning_rate,
    load_checkpoint,
    stale_build_locks,
)
from pure.train.export import export_model
from pure.train.loss import SupervisedLMLoss, full_logits_loss, supervised_loss
from pure.train.modeling import add_residual_dropout, apply_lora, enable_gradient_checkpointing, merge_lora
from pure.train.synthetic import synthetic_examples, write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes/train/tiny_cpu.yaml"
PURE_TINY_RECIPE = REPO / "recipes/pure_tiny/train.yaml"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def lm(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    return model.train().requires_grad_(True)


def _batch(fmt: SequenceFormat, n: int = 2, seed: int = 0) -> dict:
    rows = [
        {"input_ids": e.input_ids.numpy(), "prompt_length": e.prompt_length, "id": e.id}
        for e in synthetic_examples(fmt, n, latent=4, seed=seed)
    ]
    return PaddingCollator(fmt)(rows)


# -- config -------------------------------------------------------------------------------------------


def test_recipes_load_and_round_trip_through_the_resolved_yaml(tmp_path):
    for path in (
        TINY_RECIPE,
        PURE_TINY_RECIPE,
        *(REPO / f"recipes/train/{n}.yaml" for n in ("pure_7b_zero3", "pure_7b_lora")),
    ):
        recipe = load_recipe(path)
        resolved = tmp_path / path.name
        resolved.write_text(recipe_to_yaml(recipe))
        assert load_recipe(resolved) == recipe
    paper = load_recipe(REPO / "recipes/train/pure_7b_zero3.yaml").train
    assert (paper.lr, paper.min_lr, paper.warmup_epochs, paper.epochs) == (4e-4, 0.0, 0.5, 2.0)
    assert (paper.betas, paper.weight_decay, paper.grad_clip, paper.global_batch_size) == (
        [0.9, 0.95],
        0.1,
        4.0,
        128,
    )
    assert load_recipe(REPO / "recipes/train/pure_7b_zero3.yaml").data.max_length == 11776


def test_unknown_keys_fail_with_the_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lrr": 1.0}, "data": {"sets": [{"path": "x"}]}}))
    with pytest.raises(
        ConfigError, match=r"unknown key train\.lrr; valid keys in train: deepspeed, .*\blr\b"
    ):
        load_recipe(bad)
    with pytest.raises(ConfigError, match=r"unknown key 'model.dropout'|unknown key model.dropout"):
        load_recipe(TINY_RECIPE, ["model.dropout=0.1"])
    with pytest.raises(ConfigError, match="valid keys: name, output_dir, seed, model, lora"):
        load_recipe(TINY_RECIPE, ["optim.lr=0.1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.micro_batch_size=two", "train.micro_batch_size must be an integer"),
        ("train.lr=fast", "train.lr must be a number"),
        ("lora.enabled=maybe", "lora.enabled must be true or false"),
        ("train.precision=fp16", r"train.precision must be one of \['bf16', 'fp32'\]"),
        ("lora.target_modules=q_proj", "lora.target_modules must be a list"),
        ("train.global_batch_size=5", "multiple of train.micro_batch_size"),
        ("train=3", "train is a TrainConfig, not a value|train must be a mapping"),
        ("train.lr", "key=value"),
    ],
)
def test_wrong_types_in_set_fail(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(TINY_RECIPE, [override])


def test_set_overrides_are_typed():
    recipe = load_recipe(
        TINY_RECIPE, ["train.lr=4e-4", "train.epochs=3", "lora.target_modules=[q_proj, v_proj]", "seed=7"]
    )
    assert recipe.train.lr == 4e-4 and isinstance(recipe.train.epochs, float) and recipe.train.epochs == 3.0
    assert recipe.lora.target_modules == ["q_proj", "v_proj"] and recipe.seed == 7
    recipe = Recipe()
    apply_override(recipe, "data.sets=[{path: a, ratio: 2}]")
    assert recipe.data.sets[0].ratio == 2.0 and recipe.data.sets[0].name == "a"


def test_cli_reports_config_errors_in_one_line(capsys):
    from pure.train.__main__ import main

    assert main([str(TINY_RECIPE), "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key") and "valid keys in train" in err and "Traceback" not in err
    assert main([str(TINY_RECIPE), "--print-config", "--set", "train.lr=0.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.5


def test_deepspeed_batch_sizes_come_from_the_recipe(tmp_path):
    recipe = load_recipe(REPO / "recipes/train/pure_7b_zero3.yaml")
    ds = deepspeed_config(REPO / "recipes/deepspeed/zero3.json", recipe, world=8, hidden_size=4096)
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 4.0
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    for name in ("zero2", "zero3_offload"):
        deepspeed_config(REPO / f"recipes/deepspeed/{name}.json", recipe, world=32, hidden_size=4096)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size x devices"):
        deepspeed_config(REPO / "recipes/deepspeed/zero3.json", recipe, world=3, hidden_size=4096)
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match='train_batch_size is 64; set it to "auto"'):
        deepspeed_config(pinned, recipe, world=8, hidden_size=4096)


def test_schedule_warms_up_linearly_then_cosines_to_min():
    lrs = [learning_rate(s, total_steps=100, warmup_steps=25, lr=4e-4, min_lr=0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(4e-4 / 25) and lrs[24] == pytest.approx(4e-4) == lrs[25]
    assert all(a > b for a, b in itertools.pairwise(lrs[25:]))
    assert lrs[-1] == pytest.approx(4e-4 * 0.5 * (1 + np.cos(np.pi * 74 / 75)))


# -- data ---------------------------------------------------------------------------------------------


def test_epoch_plan_is_deterministic_mixes_by_ratio_and_groups_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 10000, size=300)
    pools = [np.arange(0, 100), np.arange(100, 300)]
    plan = epoch_plan(lengths, pools, [2.0, 0.5], global_batch=10, seed=1, epoch=0, length_window=2)
    again = epoch_plan(lengths, pools, [2.0, 0.5], global_batch=10, seed=1, epoch=0, length_window=2)
    other = epoch_plan(lengths, pools, [2.0, 0.5], global_batch=10, seed=1, epoch=1, length_window=2)
    assert np.array_equal(plan, again) and not np.array_equal(plan, other)
    assert plan.shape == (30, 10)
    counts = np.bincount(plan.ravel(), minlength=300)
    assert counts[:100].sum() == 200 and counts[:100].max() == 2  # set 0 twice
    assert counts[100:].max() == 1 and counts[100:].sum() == 100  # half of set 1
    grouped = np.ptp(lengths[plan], axis=1).mean()
    shuffled = np.ptp(lengths[epoch_plan(lengths, pools, [2.0, 0.5], 10, 1, 0, group_by_length=False)], 1)
    assert grouped < 0.25 * shuffled.mean()
    assert np.all(np.diff(lengths[plan], axis=1) >= 0)  # each global batch ordered by length


def test_ranks_and_accumulation_split_each_global_batch(tiny_checkpoint, tiny_format, tmp_path):
    write_synthetic_shards(tiny_checkpoint, tmp_path / "shards", n=24, per_shard=10, latent=4)
    cfg = load_recipe(TINY_RECIPE, [f"data.sets=[{{path: {tmp_path / 'shards'}}}]"]).data
    plans = []
    for rank in range(2):
        data = TrainingData.build(cfg, tiny_format, global_batch=8, micro_batch=2, world=2, rank=rank, seed=3)
        assert (data.accumulation, data.steps_per_epoch) == (2, 3)
        plans.append([b["ids"] for b in data.loader(start_step=1, total_steps=5)])
    full = TrainingData.build(cfg, tiny_format, global_batch=8, micro_batch=2, world=2, rank=0, seed=3)
    for step in range(1, 5):
        epoch, index = divmod(step, 3)
        expected = sorted(f"synthetic/{i:06d}" for i in full.plan(epoch)[index])
        got = [ids for r in range(2) for ids in plans[r][2 * (step - 1) : 2 * step]]
        assert sorted(i for ids in got for i in ids) == expected


def test_collator_pads_right_and_masks_prompt_and_padding(tiny_format):
    batch = _batch(tiny_format, n=2)
    ids, labels, image = batch["input_ids"], batch["labels"], batch["image_mask"]
    assert ids.shape == labels.shape == image.shape
    for b in range(2):
        n = int((labels[b] != IGNORE_INDEX).nonzero().max()) + 1
        assert torch.all(ids[b, n:] == tiny_format.vocab.pad) and torch.all(labels[b, n:] == IGNORE_INDEX)
        supervised = labels[b] != IGNORE_INDEX
        assert torch.equal(labels[b][supervised], ids[b][supervised])
        assert not image[b][~supervised].any()
        assert (
            int(ids[b][image[b]][0]) == tiny_format.vocab.boi
            and int(ids[b][image[b]][-1]) == tiny_format.vocab.eoi
        )


def test_image_input_noise_replaces_only_answer_codes_with_batch_codes(tiny_format):
    batch = _batch(tiny_format, n=4)
    ids, image = batch["input_ids"], batch["image_mask"]
    codes = image & tiny_format.vocab.image_mask()[ids]
    assert replace_image_inputs(ids, codes, 0.0, input_noise_generator(0, 0, 0, 0)) is ids
    noisy = replace_image_inputs(ids, codes, 0.5, input_noise_generator(0, 3, 1, 0))
    changed = noisy != ids
    assert changed.any() and not changed[~codes].any()  # the prompt (LQ block), text, grammar untouched
    assert set(noisy[changed].tolist()) <= set(ids[codes].tolist())  # drawn from the batch's codes
    assert 0.3 < changed.sum() / codes.sum() < 0.6  # ~half, less the draws of an equal code
    again = replace_image_inputs(ids, codes, 0.5, input_noise_generator(0, 3, 1, 0))
    other = replace_image_inputs(ids, codes, 0.5, input_noise_generator(0, 4, 1, 0))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)  # keyed by where it is in the run
    assert torch.equal(batch["labels"], _batch(tiny_format, n=4)["labels"])  # labels are not inputs


def test_unconditional_rows_are_the_answers_image_block_alone_as_guidance_feeds_it(tiny_format):
    batch = _batch(tiny_format, n=6)
    ids, labels, image = batch["input_ids"], batch["labels"], batch["image_mask"]
    vocab = tiny_format.vocab
    args = (vocab.boi, vocab.pad)
    assert unconditional_rows(ids, labels, image, *args, 0.0, input_noise_generator(0, 0, 0, 0))[0] is ids
    new_ids, new_labels, new_image = unconditional_rows(
        ids, labels, image, *args, 0.5, input_noise_generator(0, 3, 1, 0, UNCONDITIONAL_STREAM)
    )
    changed = [b for b in range(6) if not torch.equal(new_ids[b], ids[b])]
    assert 0 < len(changed) < 6
    for b in range(6):
        if b not in changed:
            assert torch.equal(new_labels[b], labels[b]) and torch.equal(new_image[b], image[b])
            continue
        start = int((ids[b] == vocab.boi).nonzero().max())
        codes = tiny_format.parse_image_block(ids[b, start:])
        block = tiny_format.image_block(codes)  # what the twin is fed: <boi> <h> <w>, codes, from position 0
        assert block[:3].tolist() == tiny_format.grid_tokens(*codes.shape)  # the head decoding starts it with
        n = len(ids[b]) - start
        assert torch.equal(new_ids[b, : len(block)], block) and torch.equal(new_ids[b, :n], ids[b, start:])
        assert torch.all(new_ids[b, n:] == vocab.pad) and torch.all(new_labels[b, n:] == IGNORE_INDEX)
        assert torch.equal(new_labels[b, :n], labels[b, start:])  # supervised as the answer was
        assert torch.equal(new_image[b, :n], image[b, start:]) and not new_image[b, n:].any()
    again = unconditional_rows(ids, labels, image, *args, 0.5, input_noise_generator(0, 3, 1, 0, 2))
    assert all(torch.equal(x, y) for x, y in zip(again, (new_ids, new_labels, new_image), strict=True))
    assert torch.equal(ids, _batch(tiny_format, n=6)["input_ids"])  # the batch itself is not changed


@pytest.mark.parametrize("key", ["image_input_noise", "image_input_own", "unconditional"])
def test_image_input_replacements_are_validated(key):
    recipe = Recipe()
    recipe.data.sets = [ShardSet("x")]
    apply_override(recipe, f"data.{key}=0.2")
    assert getattr(recipe.data, key) == 0.2
    setattr(recipe.data, key, 1.0)
    with pytest.raises(ConfigError, match=key):
        recipe.validate()


def test_own_samples_are_the_models_codes_for_the_next_position(lm, tiny_format):
    batch = _batch(tiny_format, n=2)
    ids = batch["input_ids"]
    is_code = tiny_format.vocab.image_mask()
    code_ids = is_code.nonzero().squeeze(1)
    hit = batch["image_mask"] & is_code[ids]
    hit &= torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    module = SupervisedLMLoss(lm)
    a, b = (module.own_samples(ids, hit, code_ids, torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.shape == (int(hit.sum()),) and torch.equal(a, b) and is_code[a].all()
    assert not any(p.grad is not None for p in lm.parameters())  # no graph, no gradients
    with torch.no_grad():  # a near-zero temperature: the samples are the argmax of the teacher-forced logits
        lm.lm_head.weight.mul_(1e4)
        logits = lm(input_ids=ids).logits
        sharp = module.own_samples(ids, hit, code_ids, torch.Generator().manual_seed(2))
    expected = code_ids[logits[:, :-1][hit[:, 1:]][:, code_ids].argmax(-1)]  # position t from t - 1
    assert torch.equal(sharp, expected) and not torch.equal(sharp, a)
    with pytest.raises(ValueError, match="position 0"):
        module.own_samples(ids, torch.ones_like(hit), code_ids, torch.Generator())


# -- loss ---------------------------------------------------------------------------------------------


def _hand_built(fmt: SequenceFormat):
    """One training sequence with a 4x4 LQ and a 4x8 HQ block, and the lengths of its parts."""
    lq = torch.arange(16).view(4, 4) % fmt.vocab.codebook_size
    hq = (torch.arange(32).view(4, 8) * 3) % fmt.vocab.codebook_size
    text = "Large blur, small noise. Two boats. "
    ids, labels = fmt.training_example(lq, text, hq)
    prompt = len(fmt.prompt_ids(lq))
    n_text = len(fmt.encode_text(text)) + 1  # answer text and the final <eot>
    n_image = fmt.image_block_length(4, 8)
    image_mask = fmt.supervised_parts(ids, prompt)[1]
    return ids[None], labels[None], image_mask[None], prompt, n_text, n_image


def test_loss_is_exact_on_a_hand_built_sequence(lm, tiny_format):
    lm.eval()
    ids, labels, image_mask, prompt, n_text, n_image = _hand_built(tiny_format)
    out = SupervisedLMLoss(lm)(ids, labels, image_mask)
    logits = lm(input_ids=ids).logits[0]  # (T, V) fp32
    log_probs = logits.log_softmax(-1)
    # position t predicts token t+1: the answer starts at `prompt`, so positions prompt-1 .. T-2
    terms = [-log_probs[t, ids[0, t + 1]] for t in range(prompt - 1, ids.shape[1] - 1)]
    assert len(terms) == n_text + n_image == int(out.n_tokens)
    assert (int(out.n_text), int(out.n_image)) == (n_text, n_image)
    assert out.ce.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    assert (out.text_part + out.image_part).item() == pytest.approx(out.ce.item(), rel=1e-6)
    image_terms = terms[n_text - 1 : n_text - 1 + n_image]  # the image block follows the answer text
    assert out.image_ce_sum.item() == pytest.approx(torch.stack(image_terms).sum().item(), rel=1e-6)


def test_prompt_and_lq_block_positions_contribute_nothing(lm, tiny_format):
    lm.eval()
    ids, labels, image_mask, prompt, _, _ = _hand_built(tiny_format)
    with torch.no_grad():
        hidden = lm.model(input_ids=ids).last_hidden_state
        base = supervised_loss(hidden, lm.lm_head, labels, image_mask).ce
        changed = hidden.clone()
        changed[:, : prompt - 1] += 10 * torch.randn_like(
            changed[:, : prompt - 1]
        )  # predicts prompt tokens only
        assert supervised_loss(changed, lm.lm_head, labels, image_mask).ce.item() == base.item()
        changed[:, prompt - 1] += 10.0  # predicts the first answer token
        assert supervised_loss(changed, lm.lm_head, labels, image_mask).ce.item() != base.item()


def test_head_on_supervised_positions_equals_full_logits_loss(lm, tiny_format):
    batch = _batch(tiny_format, n=3, seed=5)
    lm.eval()
    full = full_logits_loss(lm(input_ids=batch["input_ids"]).logits, batch["labels"])
    head_only = SupervisedLMLoss(lm)(batch["input_ids"], batch["labels"], batch["image_mask"])
    chunked = SupervisedLMLoss(lm, chunk_size=7)(batch["input_ids"], batch["labels"], batch["image_mask"])
    assert head_only.ce.item() == pytest.approx(full.item(), rel=1e-6)
    assert chunked.ce.item() == pytest.approx(full.item(), rel=1e-6)
    grads = []
    for loss in (full, head_only.loss, chunked.loss):
        lm.zero_grad()
        if loss is full:
            loss = full_logits_loss(lm(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        grads.append(lm.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-5)


def test_z_loss_uses_the_logits_that_predict_supervised_labels(lm, tiny_format):
    lm.eval()
    ids, labels, image_mask, *_ = _hand_built(tiny_format)
    out = SupervisedLMLoss(lm, z_loss_weight=1e-2)(ids, labels, image_mask)
    logits = lm(input_ids=ids).logits
    shifted = logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].logsumexp(-1).pow(2).mean()
    unshifted = logits[labels != IGNORE_INDEX].logsumexp(-1).pow(2).mean()  # PURE's off-by-one
    assert out.z_loss.item() == pytest.approx(shifted.item(), rel=1e-6)
    assert out.z_loss.item() != pytest.approx(unshifted.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((out.ce + 1e-2 * shifted).item(), rel=1e-6)


# -- model details ------------------------------------------------------------------------------------


def test_residual_dropout_in_train_mode_only(lm, tiny_format):
    ids = _hand_built(tiny_format)[0]
    with torch.no_grad():
        reference = lm.eval()(input_ids=ids).logits
        handles = add_residual_dropout(lm, 0.5)
        assert len(handles) == 2 * lm.config.num_hidden_layers
        assert torch.equal(lm.eval()(input_ids=ids).logits, reference)
        first, second = lm.train()(input_ids=ids).logits, lm(input_ids=ids).logits
        assert not torch.allclose(first, reference) and not torch.allclose(first, second)
        for handle in handles:
            handle.remove()
        assert torch.equal(lm(input_ids=ids).logits, reference)  # no other dropout in train mode


def test_gradient_checkpointing_recomputes_each_layer_and_keeps_the_gradients(lm, tiny_format):
    """Under every supported transformers (5.17 names it gradient_checkpointing_enable, later ones
    activation_checkpointing_enable): each decoder layer runs again in the backward, same gradients."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonDecoderLayer

    module = SupervisedLMLoss(lm)
    batch = _batch(tiny_format)
    calls = []
    for layer in lm.modules():
        if isinstance(layer, ChameleonDecoderLayer):
            # inside the layer: newer transformers checkpoint its forward, not its hooks; and a
            # pre-hook, as the recompute stops once it has what the backward needs
            layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients() -> dict[str, torch.Tensor]:
        calls.clear()
        lm.zero_grad()
        module(batch["input_ids"], batch["labels"], batch["image_mask"]).loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    plain, plain_calls = gradients(), len(calls)
    assert plain_calls == lm.config.num_hidden_layers
    enable_gradient_checkpointing(lm)
    checkpointed = gradients()
    assert len(calls) == 2 * plain_calls
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_lora_trains_only_adapters_and_merged_export_reloads_identically(
    lm, tiny_format, tiny_checkpoint, tmp_path
):
    base = {k: v.clone() for k, v in lm.state_dict().items()}
    peft_model = apply_lora(lm, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(TARGETS) * lm.config.num_hidden_layers
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    module = SupervisedLMLoss(peft_model)
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    batch = _batch(tiny_format)
    for _ in range(2):
        module(batch["input_ids"], batch["labels"], batch["image_mask"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), name
    frozen = peft_model.get_base_model().state_dict()
    for key, value in base.items():  # base weights under the adapters are untouched
        peft_key = key.replace(".weight", ".base_layer.weight") if any(t in key for t in TARGETS) else key
        assert torch.equal(frozen[peft_key], value), key

    peft_model.eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        adapted = peft_model.get_base_model()(input_ids=ids).logits
        merged = merge_lora(copy.deepcopy(peft_model))
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(
        merged.model.layers[0].self_attn.q_proj.weight, base["model.layers.0.self_attn.q_proj.weight"]
    )
    folder = export_model(merged, tiny_checkpoint, tmp_path / "export", dtype=torch.float32)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vq"} <= {p.name for p in folder.iterdir()}
    reloaded = load_model(folder, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged_logits)
    with pytest.raises(ValueError, match="not in the model"):
        apply_lora(load_model(tiny_checkpoint), r=4, alpha=8, dropout=0.0, target_modules=["qkv_proj"])


def test_overfitting_one_batch_lowers_the_loss(lm, tiny_format):
    torch.manual_seed(0)
    module = SupervisedLMLoss(lm)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, betas=(0.9, 0.95))
    batch = _batch(tiny_format, n=2)
    losses = []
    for _ in range(20):
        out = module(batch["input_ids"], batch["labels"], batch["image_mask"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# -- DeepSpeed runs (subprocesses) ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(
    recipe_overrides: list[str], *extra: str, recipe: Path = TINY_RECIPE, blocked: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """``python -m pure.train`` in a subprocess; ``blocked`` packages fail to import there, as if absent."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/pure/torch_extensions")
        ),
    }
    block = f"import sys; sys.modules.update(dict.fromkeys({list(blocked)!r}))"  # None: ModuleNotFoundError
    main = "from pure.train.__main__ import main; raise SystemExit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", f"{block}; {main}", str(recipe), "--set", *recipe_overrides, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """Tiny-recipe runs: 4 uninterrupted steps; the same halted after 2 and resumed; 2 LoRA steps (ZeRO-2);
    2 full fine-tuning steps with ZeRO-3."""
    if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("tensorboard") is None:
        pytest.skip("needs the train extra (deepspeed, tensorboard): pip install -e '.[train]'")
    root = tmp_path_factory.mktemp("train")
    shards = write_synthetic_shards(tiny_checkpoint, root / "shards", n=24, per_shard=12)
    common = [
        f"model.init_from={tiny_checkpoint}",
        f"data.sets=[{{path: {shards}}}]",
        "train.max_steps=4",
        "train.save_every=2",
        "logging.sample_ids=true",
        "logging.progress=false",
        "logging.peak_tflops=0.001",  # a made-up peak, so that the MFU estimate is logged on a CPU
        "data.image_input_noise=0.2",  # drawn per step and micro-batch: the resumed run must match anyway
        "data.image_input_own=0.2",  # the model's own samples: so must they (and under LoRA and ZeRO-3)
        "data.unconditional=0.3",  # image blocks alone (guidance's unconditional context), drawn alike
    ]
    _train([*common, f"output_dir={root / 'full'}"])
    _train([*common, f"output_dir={root / 'resumed'}", "train.halt_at_step=2", "train.export_at_end=false"])
    halted = {p.name for p in (root / "resumed").rglob("*")}
    _train([*common, f"output_dir={root / 'resumed'}", "train.export_at_end=false"], "--resume")
    lora = [*common, f"output_dir={root / 'lora'}", "lora.enabled=true", "lora.r=4", "train.max_steps=2"]
    _train(lora)
    zero3 = [
        *common,
        f"output_dir={root / 'zero3'}",
        "train.deepspeed=recipes/deepspeed/zero3.json",
        "train.max_steps=2",
    ]
    _train(zero3)
    return {"root": root, "halted_files": halted, "shards": shards, "lora": lora}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pure_tiny_recipe_runs_two_steps_and_records_its_time(runs, tiny_checkpoint):
    """recipes/pure_tiny/train.yaml (PURE-tiny v1) as reproduce.sh runs it, on the tiny checkpoint."""
    out = runs["root"] / "pure_tiny"
    overrides = [f"model.init_from={tiny_checkpoint}", f"data.sets=[{{path: {runs['shards']}}}]"]
    _train(
        [*overrides, "train.max_steps=2", "logging.progress=false", f"output_dir={out}"],
        recipe=PURE_TINY_RECIPE,
    )
    state = json.loads((out / "export" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["train_seconds"] > 0
    assert (
        load_recipe(out / "config.yaml").train.micro_batch_size
        == load_recipe(PURE_TINY_RECIPE).train.micro_batch_size
    )


def test_tiny_recipe_runs_two_steps_with_zero2(runs, tiny_checkpoint):
    run_dir = runs["root"] / "resumed"
    halted = runs["halted_files"]
    assert {"config.yaml", "run_info.json", "deepspeed.json", "metrics.jsonl", "latest"} <= halted
    assert {
        "step-00000002",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    } <= halted
    assert "step-00000004" not in halted and not any(name.endswith(".tmp") for name in halted)
    assert any(name.startswith("events.out.tfevents") for name in halted)
    recipe = load_recipe(run_dir / "config.yaml")
    assert recipe.model.init_from == str(Path(tiny_checkpoint).resolve())
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["git_commit"] and info["world_size"] == 1
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (4, 2, 2)
    checkpoint = run_dir / "checkpoints/step-00000002"
    saved = load_recipe(checkpoint / "config.yaml")  # the halted invocation's recipe
    assert saved.train.halt_at_step == 2
    saved.train.halt_at_step = 0
    assert saved == recipe
    assert json.loads((checkpoint / "run_info.json").read_text())["git_commit"] == info["git_commit"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 2
    first_two = _metrics(run_dir)[:2]
    assert [m["step"] for m in first_two] == [1, 2]
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens_per_s"] > 0 for m in first_two)
    assert all(m["loss_text"] > 0 and m["loss_image"] > 0 for m in first_two)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {
        "loss/total",
        "loss/text",
        "loss/image",
        "train/lr",
        "train/grad_norm",
        "perf/mfu",
        "perf/tokens_per_s",
    } <= set(events.Tags()["scalars"])


def test_resumed_run_matches_the_uninterrupted_one(runs):
    full, resumed = _metrics(runs["root"] / "full"), _metrics(runs["root"] / "resumed")
    assert [m["step"] for m in full] == [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed, strict=True):
        assert a["ids"] == b["ids"]  # same sampler order
        assert abs(a["loss"] - b["loss"]) < 1e-6
        assert a["lr"] == b["lr"]
    assert full[0]["ids"] != full[1]["ids"]


def test_export_cli_takes_a_run_folder_and_exports_its_latest_checkpoint(runs, tmp_path):
    from pure.train.export import main as export_main

    run_dir = runs["root"] / "full"  # a run folder has its own config.yaml beside checkpoints/
    assert export_main([str(run_dir), "--output", str(tmp_path / "again")]) == 0
    again, at_end = load_model(tmp_path / "again").state_dict(), load_model(run_dir / "export").state_dict()
    assert again.keys() == at_end.keys() and all(torch.equal(again[k], at_end[k]) for k in at_end)
    state = json.loads((tmp_path / "again/trainer_state.json").read_text())
    assert state["step"] == 4


def test_export_restores_an_image_through_pure_infer(runs, tmp_path):
    export = runs["root"] / "full/export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "vq", "README.md"} <= {
        p.name for p in export.iterdir()
    }
    from huggingface_hub import ModelCard

    card = ModelCard.load(export / "README.md")
    assert "pure" in card.data.tags and card.data.pipeline_tag == "image-to-image"
    assert "full fine-tuning" in card.text and "learning rate" in card.text and "shards" in card.text
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "x.png"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pure.infer",
            "--model",
            str(export),
            "--input",
            str(tmp_path / "x.png"),
            "--output",
            str(tmp_path / "x_pure.png"),
            "--size",
            "64",
            "--quiet",
            # steering skips the random model's free-running text: the test is about the image path
            "--caption",
            "A test.",
            "--degradation",
            "Small blur, small noise.",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "x_pure.png").size == (64, 64)


def test_lora_run_saves_adapters_only_and_exports_merged_weights(runs, tiny_checkpoint):
    run_dir = runs["root"] / "lora"
    checkpoint = run_dir / "checkpoints/step-00000002"
    module_state = torch.load(
        checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    assert module_state["module"] and all("lora_" in k for k in module_state["module"])
    base = load_model(tiny_checkpoint)
    tuned = load_model(run_dir / "export")
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(n.rsplit(".", 2)[-2] in TARGETS for n in changed)
    assert "LoRA r=4" in (run_dir / "export/README.md").read_text()


def test_zero3_run_exports_from_partitioned_checkpoints(runs, tiny_checkpoint):
    run_dir = runs["root"] / "zero3"
    assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 3
    metrics = _metrics(run_dir)
    full = _metrics(runs["root"] / "full")
    assert abs(metrics[0]["loss"] - full[0]["loss"]) < 1e-4  # same data, same start: ZeRO-3 is only sharding
    base, tuned = load_model(tiny_checkpoint), load_model(run_dir / "export")
    assert all(not torch.equal(p, base.state_dict()[n]) for n, p in tuned.named_parameters() if p.ndim == 2)


# -- without DeepSpeed (the GPU machine has no deepspeed, kornia, datasets or tensorboard) --------------


@pytest.fixture(scope="module")
def plain_lora(runs):
    """The LoRA run again where deepspeed, kornia, datasets and tensorboard do not import (as on the GPU
    machine): halted after step 1, then resumed."""
    out = runs["root"] / "plain_lora"
    lora = [*runs["lora"], f"output_dir={out}", "logging.tensorboard=false"]
    blocked = ("deepspeed", "kornia", "datasets", "tensorboard")
    first = _train([*lora, "train.halt_at_step=1", "train.export_at_end=false"], blocked=blocked)
    _train(lora, "--resume", blocked=blocked)
    return {"run_dir": out, "log": first.stdout + first.stderr}


def test_without_deepspeed_lora_trains_in_one_plain_process_as_deepspeed_does(plain_lora, runs):
    run_dir, deepspeed_run = plain_lora["run_dir"], runs["root"] / "lora"
    assert "plain engine (DeepSpeed is not installed)" in plain_lora["log"]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["engine"] == "plain" and "deepspeed" not in info["versions"]
    assert not (run_dir / "deepspeed.json").exists()
    plain, reference = _metrics(run_dir), _metrics(deepspeed_run)
    assert [m["step"] for m in plain] == [m["step"] for m in reference] == [1, 2]
    for a, b in zip(plain, reference, strict=True):
        assert a["ids"] == b["ids"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    checkpoint = run_dir / "checkpoints/step-00000002"
    module_state = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert module_state and all("lora_" in k for k in module_state)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["engine"] == "plain"
    tuned, expected = load_model(run_dir / "export"), load_model(deepspeed_run / "export").state_dict()
    for name, p in tuned.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_run_resumes_only_with_the_engine_that_saved_it(plain_lora):
    checkpoint = plain_lora["run_dir"] / "checkpoints/step-00000002"
    deepspeed_engine = object()  # anything without PlainEngine's kind
    with pytest.raises(ConfigError, match="saved by the plain engine and this run uses deepspeed"):
        load_checkpoint(
            deepspeed_engine, checkpoint, load_recipe(checkpoint / "config.yaml"), DistInfo(0, 1, 0, "cpu")
        )


def test_plain_engine_trains_bf16_lora_adapters_in_fp32_and_steps_at_the_boundary(
    tiny_checkpoint, tiny_format
):
    lm = load_model(tiny_checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    lm = apply_lora(lm, 4, 8.0, 0.0, TARGETS)
    module = SupervisedLMLoss(lm)
    recipe = load_recipe(TINY_RECIPE)
    engine = PlainEngine(module, build_optimizer(module, recipe, {}), 2, 1.0, torch.device("cpu"))
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())  # peft keeps adapters fp32
    batch = _batch(tiny_format)
    for micro in range(2):
        engine.backward(engine(batch["input_ids"], batch["labels"], batch["image_mask"]).loss)
        engine.step()
        params = dict(module.named_parameters())
        moved = [n for n, p in trained.items() if not torch.equal(params[n], p)]
        assert (engine.get_global_grad_norm() is None, not moved) == (
            (True, True) if micro == 0 else (False, False)
        )
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    with pytest.raises(ConfigError, match="must be fp32"):
        PlainEngine(
            SupervisedLMLoss(lm.merge_and_unload().requires_grad_(True)), None, 1, 1.0, torch.device("cpu")
        )


@pytest.mark.parametrize(
    ("absent", "overrides", "message"),
    [
        ("pyarrow", [], "pyarrow (reads the training shards)"),
        ("deepspeed", ["train.engine=deepspeed"], "deepspeed (train.engine deepspeed"),
        ("peft", ["lora.enabled=true"], "peft (lora.enabled)"),
        ("tensorboard", [], "logging.tensorboard=false to do without"),
        ("deepspeed", ["train.precision=bf16"], "DeepSpeed is not installed, and the plain engine"),
    ],
)
def test_a_missing_package_fails_in_one_line_before_the_model_loads(
    absent, overrides, message, tiny_checkpoint, monkeypatch, capsys
):
    from pure.train.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a)
    )
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("pure.train.loop.load_training_model", lambda *a: pytest.fail("loaded the model"))
    code = main([str(TINY_RECIPE), "--set", f"model.init_from={tiny_checkpoint}", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert "pip install" in err or "train.precision fp32" in err


def test_shards_of_another_tokenizer_fail_in_one_line_before_the_model_loads(
    tiny_checkpoint, monkeypatch, capsys, tmp_path
):
    from pure.data.shards import PRETOKENIZE_MANIFEST
    from pure.train.__main__ import main

    shards = write_synthetic_shards(tiny_checkpoint, tmp_path / "shards", n=4, per_shard=4, latent=4)
    (shards / PRETOKENIZE_MANIFEST).write_text(json.dumps({"tokenizer_sha256": "0" * 64}))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("pure.train.loop.load_training_model", lambda *a: pytest.fail("loaded the model"))
    sets = f"data.sets=[{{path: {shards}}}]"
    overrides = [f"model.init_from={tiny_checkpoint}", sets, "train.engine=plain"]
    code = main([str(TINY_RECIPE), *(arg for o in overrides for arg in ("--set", o))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: shard set") and "another text tokenizer" in err
    assert len(err.strip().splitlines()) == 1


def test_a_stale_extension_build_lock_fails_in_one_line_before_the_model_loads(
    tiny_checkpoint, monkeypatch, capsys, tmp_path
):
    from pure.train.__main__ import main

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fresh, stale = tmp_path / "building_now" / "lock", tmp_path / "deepspeed_shm_comm" / "lock"
    for lock in (fresh, stale):
        lock.parent.mkdir()
        lock.touch()
    hour_ago = os.stat(stale).st_mtime - 3600
    os.utime(stale, (hour_ago, hour_ago))  # a build killed an hour ago
    assert stale_build_locks() == [stale]  # a build under way is not in the way
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("pure.train.loop.load_training_model", lambda *a: pytest.fail("loaded the model"))
    code = main(
        [str(TINY_RECIPE), "--set", f"model.init_from={tiny_checkpoint}", "--set", "train.engine=deepspeed"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: stale C++ extension build lock") and f"rm {stale}" in err
    assert len(err.strip().splitlines()) == 1
    stale.unlink()
    assert stale_build_locks() == []


def test_synthetic_shards_without_datasets_fail_in_one_line(monkeypatch, capsys, tmp_path):
    from pure.train.synthetic import main

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    assert main([str(tmp_path), str(tmp_path / "shards")]) == 2
    assert "error: not installed: datasets (writes the shards)" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()
