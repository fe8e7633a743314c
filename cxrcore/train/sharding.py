"""How Ray Train shares a run's datasets among its workers."""

from __future__ import annotations

from typing import Any

import ray.train


class WholeValidation(ray.train.DataConfig):
    """Ray Train's DataConfig, but the validation split is shared among the workers without dropping rows.

    Ray splits every dataset with `streaming_split(world_size, equal=True)`, which drops up to
    world_size - 1 rows so that each worker gets as many: right for training (DDP steps in lockstep), but
    validation would then score a different, smaller set than the split it names (40 of 41 images on two
    workers). Validation runs without collectives until the results are gathered, so its shards may differ
    in size.
    """

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: list[Any] | None,
        worker_node_ids: list[Any] | None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        rest = {name: dataset for name, dataset in datasets.items() if name != "val"}
        shards = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            if val.name is None:
                val.set_name("val")
            val.context.execution_options = self._resolve_execution_options("val")
            hints = worker_node_ids if self._enable_shard_locality else None
            for shard, split in zip(
                shards, val.streaming_split(world_size, equal=False, locality_hints=hints), strict=True
            ):
                shard["val"] = split
        return shards
