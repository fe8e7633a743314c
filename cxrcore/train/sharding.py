"""How Ray Train shares a run's datasets among its workers."""

from __future__ import annotations

from typing import Any

import ray.train
from ray.data.dataset import MaterializedDataset


class WholeValidation(ray.train.DataConfig):
    """Ray Train's DataConfig, but the validation split is shared among the workers without dropping rows,
    and a dataset already in memory is divided without a coordinator actor.

    Ray splits every dataset with `streaming_split(world_size, equal=True)`, which drops up to
    world_size - 1 rows so that each worker gets as many: right for training (DDP steps in lockstep), but
    validation would then score a different, smaller set than the split it names (40 of 41 images on two
    workers). Validation runs without collectives until the results are gathered, so its shards may differ
    in size.

    A streaming split also starts a SplitCoordinator actor per dataset, which imports Ray Data and plans
    every epoch's execution: about 3 CPU-seconds each to start on the 2-core machine, twice per run. A
    materialized dataset (the small data the driver reads, or data that fits the object store) has its
    blocks already; each worker gets a consecutive share of its rows (`split_at_indices`, slices of the
    blocks, no copy) and reads it itself: shares that differ by one row at most, of which the training
    loop takes rows // world_size a worker each epoch (`rows_per_worker`), so that the workers step in
    lockstep. Each worker then sees the same rows every epoch, in an order its shuffle buffer draws anew,
    and one with a row more leaves out the row its shuffle draws last: a different one each epoch. Cut to
    equal shares, the same rows (up to world_size - 1) were left out of every epoch of every seed (a
    review, session 54).

    One worker (the default on CPU) needs no split: it gets each dataset's own iterator, and a dataset
    streamed from Parquet is then executed in the worker itself, as Ray Train does for the datasets it does
    not split, without a coordinator actor: two actors fewer per run (a one-epoch run on streamed data
    took 30-33 CPU-seconds against 38-40 with them, on the 2-core machine). Its training data is read in
    order (its files in the order drawn from --seed for the epoch), so that the same --seed trains the same
    model on streamed data too: Ray Data's default let blocks arrive as their tasks finished. A single
    reader pays nothing for it (3,200 rows at 256 px: epochs 5.20 s against 5.71, medians of four, session
    56); several workers' streaming split still hands blocks out as each asks.
    """

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: list[Any] | None,
        worker_node_ids: list[Any] | None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        # Ray's own split: training data streamed to several workers.
        by_ray = {
            name: dataset
            for name, dataset in datasets.items()
            if name != "val" and not isinstance(dataset, MaterializedDataset) and world_size > 1
        }
        shards = super().configure(by_ray, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, dataset in datasets.items():
            if name in by_ray:
                continue
            equal = name != "val"  # training in lockstep; validation scores every row
            if isinstance(dataset, MaterializedDataset):
                rows = dataset.count()  # from the blocks' metadata
                # consecutive parts that differ by one row at most (training: the loop takes as many of each)
                cuts = [rows * i // world_size for i in range(1, world_size)]
                pieces = dataset.split_at_indices(cuts) if world_size > 1 else [dataset]
                parts = [piece.iterator() for piece in pieces]
            else:
                dataset = dataset.copy(dataset)
                dataset.set_name(dataset.name or name)
                dataset.context.execution_options = self._resolve_execution_options(name)
                if world_size == 1 and name == "train":
                    dataset.context.execution_options.preserve_order = True  # the same --seed, the same run
                if world_size > 1:
                    parts = dataset.streaming_split(world_size, equal=equal, locality_hints=hints)
                else:
                    parts = [dataset.iterator()]
            for shard, part in zip(shards, parts, strict=True):
                shard[name] = part
        return shards
