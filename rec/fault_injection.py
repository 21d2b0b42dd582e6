"""A test hook for fault tolerance (no Ray): one worker dies hard, once, at a chosen step.

`train.inject_failure_at_step=7` makes rank 1 SIGKILL itself at optimizer step 7 of the first
attempt; the run must then resume from its latest checkpoint with its step count intact
(tests/test_train_ray.py). A marker file in the run's storage keeps restarts from dying again.

With RAYDIV_STEP_LOG=<file> in the environment (bench/chaos_train.py sets it for the driver,
whose local Ray passes it to the workers), rank 0 also appends "<unix time> <step>" to that
file at every micro-batch: after faults injected from outside, the log shows which steps a
restart trained again.
"""

from __future__ import annotations

import os
import signal
import time

from rec import storage


def maybe_inject_failure(at_step: int | None, rank: int, step: int, storage_dir: str) -> None:
    """Kill this process if it is rank 1 at `at_step` and no earlier attempt did so."""
    step_log = os.environ.get("RAYDIV_STEP_LOG")
    if step_log and rank == 0:
        with open(step_log, "a") as f:  # ~20 us a step: noise next to a training step
            f.write(f"{time.time():.3f} {step}\n")
    if at_step is None or rank != 1 or step != at_step:
        return
    marker = storage.join(storage_dir, "injected_failure")  # a local path or a URI
    if storage.exists(marker):
        return
    storage.write_text(marker, str(step))
    # Ray Train's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a
    # worker dying sooner after a report can take that report's checkpoint with it, and the
    # run then restarts one checkpoint earlier. Waiting makes the hook test resume, not luck.
    time.sleep(5.0)
    os.kill(os.getpid(), signal.SIGKILL)
