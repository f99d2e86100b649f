"""A shuffling sampler that a resumed run continues exactly where the interrupted one stopped.

``DataLoader(shuffle=True)`` draws each pass's order from torch's global generator when its iterator starts;
an epoch of ``epoch_length`` iterations rarely ends with a pass, so a run resumed from a checkpoint starts a
new order mid-pass and sees other batches than the uninterrupted run. Here the order of pass ``p`` depends on
``(seed, p)`` only, the stream never ends (ignite's ``epoch_length`` delimits epochs), and the number of
indices handed out is part of the checkpoint (see :class:`monai_mdm.handlers.RandomStates`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableShuffleSampler"]


class ResumableShuffleSampler(Sampler[int]):
    """Endless shuffled passes over ``data_source``; ``state_dict`` / ``load_state_dict`` carry the position.

    The position counts the indices handed to the data loader: exact with ``num_workers=0``; with workers,
    the batches they had prefetched at the checkpoint are skipped on resume.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.size = len(data_source)
        if self.size < 1:
            raise ValueError("ResumableShuffleSampler needs a non-empty data set.")
        self.seed = int(seed)
        self.drawn = 0

    def __len__(self) -> int:
        return self.size  # one pass; the stream itself is endless

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.drawn, self.size)
        while True:
            for index in self._order(epoch)[offset:]:
                self.drawn += 1
                yield index
            epoch, offset = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(
                f"the checkpoint's data set had {state['size']} images, this run's has {self.size}: resume with the "
                "same --dataset_dir, or start in a new output folder."
            )
        self.drawn, self.seed = int(state["drawn"]), int(state["seed"])
