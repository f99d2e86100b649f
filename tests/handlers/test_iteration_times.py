"""IterationTimes: every iteration's wall time and the median throughput, written when the run ends."""

from __future__ import annotations

import json
import time

from ignite.engine import Engine

from monai_mdm.handlers import IterationTimes


def test_iteration_times_are_written_with_the_median_throughput(tmp_path):
    def step(engine, batch):
        time.sleep(0.05 if engine.state.iteration == 1 else 0.01)  # a slow first iteration, as with autotuning

    engine = Engine(step)
    path = tmp_path / "timing" / "times.json"
    IterationTimes(path, images_per_iteration=8, device="cpu", warmup=1).attach(engine)
    engine.run(range(5), max_epochs=1)

    saved = json.loads(path.read_text())
    assert len(saved["iteration_s"]) == 5 and saved["world_size"] == 1
    assert saved["iteration_s"][0] > 0.045  # the first iteration counts from the run's start
    assert 0.009 < saved["median_iteration_s"] < 0.045  # the slow first one is left out of the median
    assert saved["median_images_per_s"] == 8 / saved["median_iteration_s"]
