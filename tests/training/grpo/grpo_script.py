"""train/grpo.py for the tests: with the reward a random tiny model earns unevenly (`letter_e`); with
KVTRAIN_TEST_KILL=step:N, dying abruptly (os._exit, like a SIGKILL: no cleanup) when step N + 1 begins, after N
steps and their checkpoint; with KVTRAIN_TEST_STEPS=FILE, appending the number of each step this process trains."""

from __future__ import annotations

import os
import sys

from transformers import TrainerCallback

import tests.training.grpo.uneven_rewards  # noqa: F401 - registers letter_e
from kvtrain.errors import debug_requested, run_entry_point
from kvtrain.training.grpo.run import main

EXIT_CODE = 17


class DieAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(EXIT_CODE)


class NoteSteps(TrainerCallback):
    def __init__(self, path: str):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with open(self.path, "a") as handle:
                handle.write(f"{state.global_step}\n")


if __name__ == "__main__":
    kill, steps = os.environ.get("KVTRAIN_TEST_KILL"), os.environ.get("KVTRAIN_TEST_STEPS")
    callbacks = ([DieAtStep(int(kill.partition(":")[2]))] if kill else []) + ([NoteSteps(steps)] if steps else [])
    sys.exit(run_entry_point(lambda: main(sys.argv[1:], callbacks=callbacks), prog="train/grpo.py",
                             debug=debug_requested()))
