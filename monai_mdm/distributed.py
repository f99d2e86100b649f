"""Multi-process training launched by ``torchrun``: joining the process group, the rank's device, the batch split.

The bundles' ``multi_gpu_train.json`` files call these, so the rules live in one place: every process reads
its rank from the environment ``torchrun`` sets, trains on ``cuda:<LOCAL_RANK>`` (or the CPU when there is no
GPU), and takes ``global batch / world size`` samples per step, so that a run on N processes optimises with
the same batch as a run on one. Rank, world size and reductions are ignite's (``ignite.distributed``), which
also answers rank 0 of 1 when no process group exists.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "init_distributed", "local_device", "per_rank_batch_size", "rank_sampler"]

logger = logging.getLogger(__name__)

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU (several CPU processes share it)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(backend: str) -> None:
    """Join the process group ``torchrun`` prepared (rank, world size and rendezvous come from its environment).

    Args:
        backend: ``"nccl"`` for GPUs, ``"gloo"`` for CPUs (or GPUs without NCCL).
    """
    if dist.is_available() and dist.is_initialized():
        return
    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi_gpu_train.json needs the environment variables {missing}, which torchrun sets: launch with "
            "`torchrun --standalone --nproc_per_node=N -m monai.bundle run --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\"`."
        )
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA GPUs; use --backend gloo to train on CPUs.")
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend)
    logger.info(
        f"rank {idist.get_rank()} of {idist.get_world_size()} (local rank {os.environ['LOCAL_RANK']}) "
        f"on {local_device()}, backend {backend}."
    )


def rank_sampler(dataset: Any) -> Any:
    """The sampler that gives each process its part of ``dataset``, or None for a dataset that shards itself.

    The few-shot feature cache splits its crops by rank when it is built (``num_shards``/``shard``), so it needs no
    sampler; any other dataset (the online crops of fine-tuning, the baseline UNet) gets MONAI's
    ``DistributedSampler``. Deciding from the dataset keeps one multi-GPU overlay valid for every feature path.
    """
    from monai.data import DistributedSampler

    from monai_mdm.data import FeatureCache

    return None if isinstance(dataset, FeatureCache) else DistributedSampler(dataset, shuffle=True)


def per_rank_batch_size(batch_size: int, world_size: int | None = None) -> int:
    """Samples each process takes per step so that all processes together take ``batch_size``.

    Refuses a global batch that does not split evenly: silently rounding would change the optimisation.
    """
    world_size = idist.get_world_size() if world_size is None else int(world_size)
    if batch_size < world_size or batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must be a multiple of the {world_size} processes "
            f"(each takes batch_size / {world_size}); set --batch_size to a multiple of {world_size}."
        )
    return batch_size // world_size


def all_gather_objects(value: object) -> list:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` when not distributed.

    Kept beside ``ignite.distributed.all_gather`` because that one picks its collective from the value's type
    (tensor, number, str or object): ranks holding ``None`` and a message would call different collectives and
    hang. This one always gathers objects.
    """
    if idist.get_world_size() == 1:
        return [value]
    gathered: list = [None] * idist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
