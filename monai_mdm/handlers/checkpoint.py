"""Checkpointing that survives a killed run: atomic writes, EMA beside raw weights, and resume from the latest."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable, Transform

from monai_mdm.distributed import all_gather_objects
from monai_mdm.networks.interchange import UNET_FORMAT, model_file
from monai_mdm.utils import atomic_torch_save, load_torch_file, prepare_output_folder

logger = logging.getLogger(__name__)

_CKPT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")


def find_latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The ``checkpoint_<iteration>.pt`` in ``save_dir`` with the highest iteration, or None."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in save_dir.iterdir() if (m := _CKPT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def _state_dict(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


class RandomStates:
    """Every random stream a training run draws from, as one checkpointable object, so that a resumed run is
    bit-identical to an uninterrupted one: torch's (masks, timesteps, shuffling, data-loader worker seeds), CUDA's,
    numpy's, Python's, the own generators of MONAI's random transforms (crops, flips) in ``transforms``, and the
    position of a :class:`~monai_mdm.data.ResumableShuffleSampler`. Exact with ``num_workers=0``: data-loader
    workers hold their own copies of the transforms.
    """

    def __init__(self, transforms: Any = None, sampler: Any = None) -> None:
        self.transforms = _randomizables(transforms) if transforms is not None else []
        # a sampler with a position (ResumableShuffleSampler); others (DistributedSampler) restart their pass
        self.sampler = sampler if hasattr(sampler, "load_state_dict") else None

    def resume_without_state(self, engine: Engine) -> None:
        """A checkpoint written before the streams were saved resumes with the streams as they are."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "transforms": [t.R.get_state() for t in self.transforms],
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds {len(state['transforms'])} random transforms' states, this config has "
                f"{len(self.transforms)}: it was written by another preprocessing; resume in a new output folder."
            )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        for t, s in zip(self.transforms, state["transforms"]):
            t.R.set_state(s)
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])


def _randomizables(obj: Any, found: dict[int, Any] | None = None) -> list[Any]:
    """Every MONAI ``Randomizable`` in ``obj``, including those inside other transforms (a dictionary
    transform's array transform keeps a generator of its own), each once, in a fixed order."""
    found = {} if found is None else found
    if id(obj) in found:
        return list(found.values())
    if isinstance(obj, Randomizable):
        found[id(obj)] = obj
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, Transform):
        children = [vars(obj)[k] for k in sorted(vars(obj))]
    else:
        children = []
    for child in children:
        _randomizables(child, found)
    return list(found.values())


class TrainingCheckpoint:
    """Save the whole training state every ``save_interval`` iterations and resume from the newest one.

    Why not MONAI's ``CheckpointSaver``: it writes non-atomically, and resuming needs "load the latest file
    if there is one", which a fixed ``load_path`` cannot express. Why not ignite's ``Checkpoint`` with
    ``DiskSaver(atomic=True)``: it deletes the oldest checkpoint before the new one is written, so a write that
    fails (full disk, a kill) leaves one checkpoint fewer, none with ``n_saved=1``; its atomic write does not
    flush to disk before the rename; and it prunes only the files it has listed itself (its own state, saved
    with ``include_self``), not what an earlier run left in the folder. Here the new file is written and synced first, then the oldest beyond ``n_saved`` go. Each checkpoint holds every object in
    ``save_dict`` (network, EMA network, optimizer, grad scaler, trainer); at the end of training the raw
    and EMA network weights are also written as ``model.pt`` and ``model_ema.pt``.

    Args:
        save_dir: folder for ``checkpoint_<iteration>.pt`` files.
        save_dict: name -> object with ``state_dict``/``load_state_dict``; the engine this handler is attached
            to (and its AMP grad scaler) are added as "trainer" (and "scaler").
        save_interval: iterations between checkpoints (0 disables periodic saving).
        n_saved: how many periodic checkpoints to keep (oldest removed after a newer one is safely written).
        resume: load the latest checkpoint in ``save_dir`` when training starts.
        final_models: name in ``save_dict`` -> file name written when training completes.
        describe: optional object whose ``describe(engine, module=None)`` returns what the run has done so far
            (e.g. the :class:`~monai_mdm.handlers.EMA` handler: iteration and EMA state). Each checkpoint then
            holds it under ``"pretraining"``. A final UNet model (a network with ``to_guided_diffusion_config``)
            is written in the project's model-file layout (``networks.interchange.model_file``: its config, its
            weights under ``"model"``, the record under ``"pretraining"``), which ``load_pretrained`` reads.
        record: fixed entries added to that record (the pretraining bundle's ``{"objective": ...}``, the
            objective that trains the network). Resuming a checkpoint whose record names another objective is
            refused before anything is loaded; checkpoints without an objective entry were MDM's.

    In multi-process (DDP) training every rank resumes from the same checkpoint (checked: a rank that finds
    another one stops the run) but only rank 0 writes.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping[str, Any],
        save_interval: int = 1000,
        n_saved: int = 2,
        resume: bool = True,
        final_models: Mapping[str, str] | None = None,
        describe: Any = None,
        record: Mapping[str, Any] | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.n_saved = max(1, int(n_saved))
        self.resume = resume
        self.final_models = dict(final_models) if final_models is not None else {}
        self.describe = describe
        self.record = dict(record) if record is not None else {}
        for name in self.final_models:
            if name not in self.save_dict:
                raise KeyError(f"final_models names '{name}', which is not in save_dict ({sorted(self.save_dict)}).")

    def attach(self, engine: Engine) -> None:
        # the engine cannot be named in its own handler's config (a circular reference), so it joins here
        self.save_dict.setdefault("trainer", engine)
        if getattr(engine, "scaler", None) is not None:
            self.save_dict.setdefault("scaler", engine.scaler)
        engine.add_event_handler(Events.STARTED, self.prepare)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load_latest)
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_final)

    def prepare(self, engine: Engine) -> None:
        if idist.get_rank() == 0:
            prepare_output_folder(self.save_dir)

    def save(self, engine: Engine) -> Path | None:
        if idist.get_rank() != 0:
            return None
        path = self.save_dir / f"checkpoint_{engine.state.iteration}.pt"
        state = {k: _state_dict(v) for k, v in self.save_dict.items()}
        described = self._describe(engine)
        if described is not None:
            state["pretraining"] = described
        atomic_torch_save(state, path)
        old = sorted(
            (int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := _CKPT_PATTERN.match(p.name))
        )
        for _, stale in old[: -self.n_saved]:
            stale.unlink(missing_ok=True)
        return path

    def save_final(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if self.save_interval > 0 and engine.state.iteration % self.save_interval != 0:
            self.save(engine)
        for name, filename in self.final_models.items():
            obj = self.save_dict[name]
            state = _state_dict(obj)
            described = self._describe(engine, obj)
            if hasattr(obj, "to_guided_diffusion_config"):  # the UNet: the project's model-file layout
                extra = {} if described is None else {"pretraining": described}
                state = model_file(UNET_FORMAT, obj.to_guided_diffusion_config(), state, **extra)
            elif described is not None:
                state = {"state_dict": state, "pretraining": described}
            atomic_torch_save(state, self.save_dir / filename)

    def _describe(self, engine: Engine, module: Any = None) -> dict[str, Any] | None:
        if self.describe is None and not self.record:
            return None
        described = {} if self.describe is None else dict(
            self.describe.describe(engine) if module is None else self.describe.describe(engine, module)
        )
        return {**described, **self.record}

    def _check_objective(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Refuse to resume a checkpoint of another objective (no entry: an MDM checkpoint)."""
        wanted = self.record.get("objective")
        if not isinstance(wanted, Mapping):
            return
        recorded = checkpoint.get("pretraining") if isinstance(checkpoint.get("pretraining"), Mapping) else {}
        found = recorded.get("objective") or {"name": "mdm"}
        found_name = found.get("name") if isinstance(found, Mapping) else found
        if found_name != wanted.get("name"):
            raise ValueError(
                f"--objective {wanted.get('name')}: the checkpoint '{path}' this run would resume was pretrained "
                f"with objective {found_name!r}. Resume with --objective {found_name}, or start in a new --output_dir."
            )

    def load_latest(self, engine: Engine) -> None:
        path = find_latest_checkpoint(self.save_dir)
        found = all_gather_objects(None if path is None else path.name)
        if len(set(found)) > 1:
            raise RuntimeError(
                f"the ranks found different checkpoints in '{self.save_dir}' ({found}, by rank): in multi-node "
                "training output_dir must be on a filesystem that every node sees."
            )
        if path is None:
            return
        checkpoint = load_torch_file(path, "checkpoint", "Fix: delete it to resume from the previous one, or start "
                                     "in an empty output folder.", weights_only=False)
        self._check_objective(checkpoint, path)
        # objects added to save_dict after the checkpoint was written may know how to carry on without it
        absent = [k for k in self.save_dict if k not in checkpoint]
        later = [k for k in absent if hasattr(self.save_dict[k], "resume_without_state")]
        missing = [k for k in absent if k not in later]
        if missing:
            raise KeyError(f"checkpoint '{path}' lacks {missing}; it was written by another workflow.")
        # remember what the current run asks for; the checkpoint only supplies the progress so far
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        for name, obj in self.save_dict.items():
            if name in later:
                continue
            try:
                obj.load_state_dict(checkpoint[name])
            except RuntimeError as e:
                raise RuntimeError(
                    f"checkpoint '{path}' does not fit '{name}' of this run: {str(e)[:600]}\n"
                    "It was probably trained with another preset or settings; use the same settings or a "
                    "new output folder."
                ) from e
        state = engine.state
        for name in later:
            self.save_dict[name].resume_without_state(engine)
            logger.warning(f"checkpoint '{path}' has no '{name}' (written before it was saved); derived from the run.")
        state.max_epochs, state.epoch_length = max_epochs, epoch_length
        if epoch_length:
            # ignite counts the epoch in progress; resuming mid-epoch continues that epoch
            state.epoch = state.iteration // epoch_length
        logger.info(f"resumed from '{path}' at iteration {state.iteration}.")


class StopAtIteration:
    """End training after exactly ``max_iterations`` iterations, whatever the epoch length.

    Bundles count training in iterations (as the paper does) while ignite counts epochs; this closes the gap.
    """

    def __init__(self, max_iterations: int) -> None:
        if int(max_iterations) < 1:
            raise ValueError(f"max_iterations must be at least 1, got {max_iterations}.")
        self.max_iterations = int(max_iterations)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_iterations:
            engine.terminate()
