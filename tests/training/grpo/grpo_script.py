"""train/grpo.py for the tests: with the reward a random tiny model earns unevenly (`letter_e`), and, with
KVTRAIN_TEST_KILL=step:N, dying abruptly (os._exit, like a SIGKILL: no cleanup) when step N + 1 begins, after N
steps and their checkpoint."""

from __future__ import annotations

import os
import sys

from transformers import TrainerCallback

import tests.training.grpo.uneven_rewards  # noqa: F401 - registers letter_e
from kvtrain.training.grpo.run import main

EXIT_CODE = 17


class DieAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os._exit(EXIT_CODE)


if __name__ == "__main__":
    kill = os.environ.get("KVTRAIN_TEST_KILL")
    callbacks = [DieAtStep(int(kill.partition(":")[2]))] if kill else None
    main(sys.argv[1:], callbacks=callbacks)
