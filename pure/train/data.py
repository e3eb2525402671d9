"""Training data: shard sets mixed by ratio, a length-grouped epoch plan, per-rank batches, padding.

The order of examples is a pure function of ``(seed, epoch)`` and the shard sets, so a run resumed at
step ``s`` reads exactly the batches an uninterrupted run reads from step ``s`` on: the only sampler
state is the step.

Epoch plan (as PURE's ``FinetuneDistSampler``): each set contributes ``floor(ratio)`` copies of itself
plus ``int(n * frac(ratio))`` examples drawn without replacement; with length grouping the pool is
sorted by length, shuffled inside windows of ``length_window`` global batches, cut into global batches,
and the batches are shuffled; the tail that does not fill a global batch is dropped. Within a global
batch examples are ordered by length, so each micro-batch pads little. Micro-step ``a`` of rank ``r``
reads slice ``a * world + r`` of its global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pure.data.shards import ShardError, ShardSet, load_shard_set
from pure.sequence import IGNORE_INDEX, SequenceFormat


class ShardDataset(Dataset):
    """Every example of several shard sets, indexed globally (set 0 first): memory-mapped Arrow tables,
    read with pyarrow alone (no ``datasets``)."""

    def __init__(self, sets: list[ShardSet]):
        import pyarrow as pa

        if not sets:
            raise ShardError("no shard sets given (data.sets or data.config)")
        self.sets = sets
        parts = [load_shard_set(s.path) for s in sets]
        self.sizes = [p.num_rows for p in parts]
        self.offsets = np.cumsum([0, *self.sizes])
        self.table = pa.concat_tables(parts)
        self.lengths = self.table.column("length").to_numpy().astype(np.int64)  # (N,)

    def __getstate__(self) -> dict:  # a worker process maps the files again rather than copying them
        return {"sets": self.sets}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["sets"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.table.take(list(indices))  # one Arrow read for the whole micro-batch
        ids = rows.column("input_ids").combine_chunks()
        sequences = np.split(ids.flatten().to_numpy(), np.cumsum(ids.value_lengths().to_numpy())[:-1])
        prompt_lengths, names = rows.column("prompt_length").to_pylist(), rows.column("id").to_pylist()
        return [
            {"input_ids": seq, "prompt_length": pl, "id": i}
            for seq, pl, i in zip(sequences, prompt_lengths, names, strict=True)
        ]


def epoch_plan(
    lengths: np.ndarray,
    pools: list[np.ndarray],
    ratios: list[float],
    global_batch: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    length_window: int = 500,
) -> np.ndarray:
    """``(steps, global_batch)`` global example indices of one epoch (see the module docstring).

    ``pools[k]`` are the usable indices of set ``k`` (e.g. those not longer than ``max_length``).
    """
    rng = np.random.default_rng([seed, epoch])
    chosen = []
    for pool, ratio in zip(pools, ratios, strict=True):
        whole, frac = int(ratio), ratio - int(ratio)
        chosen += [pool] * whole
        chosen.append(rng.choice(pool, int(len(pool) * frac), replace=False))
    order = rng.permutation(np.concatenate(chosen))
    if group_by_length:
        order = order[np.argsort(lengths[order], kind="stable")]  # by length, ties in random order
        window = length_window * global_batch
        for start in range(0, len(order), window):
            rng.shuffle(order[start : start + window])  # in place on the view
    steps = len(order) // global_batch
    batches = order[: steps * global_batch].reshape(steps, global_batch)
    if group_by_length:
        batches = batches[rng.permutation(steps)]
    by_length = np.argsort(lengths[batches], axis=1, kind="stable")
    return np.take_along_axis(batches, by_length, axis=1)


class PaddingCollator:
    """Rows -> right-padded ``input_ids``, ``labels`` and ``image_mask`` ``(B, T)`` plus ``ids``.

    ``labels`` are ``-100`` over prompts and padding; ``image_mask`` marks the answer's image block.
    """

    def __init__(self, fmt: SequenceFormat):
        self.fmt = fmt
        self.pad_id = fmt.vocab.pad

    def __call__(self, rows: list[dict]) -> dict:
        seqs = [torch.from_numpy(np.asarray(r["input_ids"], dtype=np.int64)) for r in rows]
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, (ids, row) in enumerate(zip(seqs, rows, strict=True)):
            n = len(ids)
            input_ids[b, :n] = ids
            labels[b, :n] = self.fmt.labels_from_prompt_length(ids, row["prompt_length"])
            image_mask[b, :n] = self.fmt.supervised_parts(ids, row["prompt_length"])[1]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "image_mask": image_mask,
            "ids": [r["id"] for r in rows],
            "n_tokens": sum(len(s) for s in seqs),
        }


def replace_image_inputs(
    input_ids: torch.Tensor, code_mask: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """A copy of ``input_ids`` in which each position of ``code_mask`` (the answer's image codes) holds,
    with probability ``fraction``, a code drawn from those positions anywhere in the batch.

    Only inputs change: labels keep the true codes, so the model still learns every HQ code but cannot
    rely on its own previous ones, as it cannot at inference, where they are its own samples (exposure
    bias). What it can always rely on is the LQ block, which is never touched. Not in PURE (its 7B model
    was pretrained on images); the PURE-tiny v2 recipe uses it. ``fraction`` 0 returns ``input_ids``.
    """
    if fraction <= 0:
        return input_ids
    pool = input_ids[code_mask]
    hit = code_mask & (torch.rand(input_ids.shape, generator=generator) < fraction)
    n = int(hit.sum())
    if n == 0:
        return input_ids
    ids = input_ids.clone()
    ids[hit] = pool[torch.randint(pool.numel(), (n,), generator=generator)]
    return ids


def unconditional_rows(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    image_mask: torch.Tensor,
    boi: int,
    pad: int,
    fraction: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of a ``(B, T)`` batch in which each row, with probability ``fraction``, is replaced by its
    answer's image block alone, from column 0 (so from position 0), the rest padding: the context of
    classifier-free guidance's unconditional branch (:mod:`pure.decoding.layout`'s twin: ``<boi>``, the grid
    tokens and the codes, without BOS, instruction, LQ or text), supervised as the answer was. A model that
    never saw that context (PURE-tiny, trained from scratch; PURE's 7B learnt it in its pretraining) gives
    guidance an untrained prior to pull towards. Not in PURE. ``fraction`` 0 returns the batch as it is."""
    if fraction <= 0:
        return input_ids, labels, image_mask
    chosen = (torch.rand(input_ids.shape[0], generator=generator) < fraction).nonzero().flatten().tolist()
    if not chosen:
        return input_ids, labels, image_mask
    input_ids, labels, image_mask = input_ids.clone(), labels.clone(), image_mask.clone()
    for row in chosen:
        start = int((input_ids[row] == boi).nonzero().max())  # the answer's block is the row's last
        n = input_ids.shape[1] - start
        for tensor, fill in ((input_ids, pad), (labels, IGNORE_INDEX), (image_mask, False)):
            tensor[row, :n] = tensor[row, start:].clone()
            tensor[row, n:] = fill
    return input_ids, labels, image_mask


NOISE_STREAM, OWN_SAMPLES_STREAM, UNCONDITIONAL_STREAM = 0, 1, 2  # a micro-batch's draws, a generator each


def input_noise_generator(
    seed: int, step: int, micro: int, rank: int, stream: int = NOISE_STREAM
) -> torch.Generator:
    """The generator of :func:`replace_image_inputs` (``NOISE_STREAM``) or of the model's own samples
    (``OWN_SAMPLES_STREAM``) for one micro-batch: a function of where it is in the run, so that a resumed
    run draws what the uninterrupted one drew."""
    entropy = [seed, step, micro, rank] + ([stream] if stream else [])
    key = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


class StepBatchSampler:
    """Yields this rank's micro-batches (lists of indices) for steps ``start_step .. total_steps-1``."""

    def __init__(
        self,
        plan_fn,
        steps_per_epoch: int,
        start_step: int,
        total_steps: int,
        rank: int,
        world: int,
        micro_batch: int,
        accumulation: int,
    ):
        self.plan_fn = plan_fn
        self.steps_per_epoch = steps_per_epoch
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world = rank, world
        self.micro_batch, self.accumulation = micro_batch, accumulation

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        plan, plan_epoch = None, -1
        for step in range(self.start_step, self.total_steps):
            epoch, index = divmod(step, self.steps_per_epoch)
            if epoch != plan_epoch:
                plan, plan_epoch = self.plan_fn(epoch), epoch
            batch = plan[index]  # (global_batch,)
            for a in range(self.accumulation):
                start = (a * self.world + self.rank) * self.micro_batch
                yield batch[start : start + self.micro_batch].tolist()


@dataclass
class TrainingData:
    """The data side of a run: which examples, in which order, for which rank."""

    dataset: ShardDataset
    pools: list[np.ndarray]
    ratios: list[float]
    skipped: int
    global_batch: int
    micro_batch: int
    world: int
    rank: int
    seed: int
    group_by_length: bool
    length_window: int
    collator: PaddingCollator
    num_workers: int = 0

    @classmethod
    def build(
        cls,
        data_cfg,
        fmt: SequenceFormat,
        global_batch: int,
        micro_batch: int,
        world: int,
        rank: int,
        seed: int,
    ) -> TrainingData:
        """From the recipe's ``data`` section (:class:`pure.train.config.DataConfig`)."""
        sets = data_cfg.shard_sets()
        dataset = ShardDataset(sets)
        pools, skipped = [], 0
        for k in range(len(sets)):
            idx = np.arange(dataset.offsets[k], dataset.offsets[k + 1])
            keep = idx[dataset.lengths[idx] <= data_cfg.max_length]
            skipped += len(idx) - len(keep)
            if len(keep) == 0:
                raise ShardError(
                    f"shard set {sets[k].path}: no example fits data.max_length={data_cfg.max_length}"
                )
            pools.append(keep)
        data = cls(
            dataset=dataset,
            pools=pools,
            ratios=[s.ratio for s in sets],
            skipped=skipped,
            global_batch=global_batch,
            micro_batch=micro_batch,
            world=world,
            rank=rank,
            seed=seed,
            group_by_length=data_cfg.group_by_length,
            length_window=data_cfg.length_window,
            collator=PaddingCollator(fmt),
            num_workers=data_cfg.num_workers,
        )
        if data.steps_per_epoch == 0:
            raise ShardError(
                f"an epoch has {data.examples_per_epoch} examples, fewer than one global batch "
                f"of {global_batch}"
            )
        return data

    @property
    def examples_per_epoch(self) -> int:
        return sum(
            int(r) * len(p) + int(len(p) * (r - int(r))) for p, r in zip(self.pools, self.ratios, strict=True)
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.examples_per_epoch // self.global_batch

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)

    def plan(self, epoch: int) -> np.ndarray:
        return epoch_plan(
            self.dataset.lengths,
            self.pools,
            self.ratios,
            self.global_batch,
            self.seed,
            epoch,
            self.group_by_length,
            self.length_window,
        )

    def loader(self, start_step: int, total_steps: int) -> DataLoader:
        """Micro-batches of this rank from ``start_step`` on: ``accumulation`` of them per step."""
        sampler = StepBatchSampler(
            self.plan,
            self.steps_per_epoch,
            start_step,
            total_steps,
            self.rank,
            self.world,
            self.micro_batch,
            self.accumulation,
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers else None,
            # its own generator: making an iterator must not draw from the global RNG (dropout masks)
            generator=torch.Generator().manual_seed(self.seed),
        )
