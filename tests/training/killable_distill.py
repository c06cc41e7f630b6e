"""train/distill.py that dies abruptly (os._exit, like a SIGKILL: no cleanup) at a chosen point.

KVTRAIN_TEST_KILL=step:N  dies when step N + 1 begins (after N steps and their checkpoint);
KVTRAIN_TEST_KILL=save:N  dies while checkpoint N is being written (weights written, optimizer not).
"""

from __future__ import annotations

import os
import sys

from transformers import TrainerCallback

from kvtrain.training.run import main
from kvtrain.training.trainer import CompressionDistillationTrainer

EXIT_CODE = 17
where, _, at = os.environ["KVTRAIN_TEST_KILL"].partition(":")
at_step = int(at)


class DieAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == at_step:
            os._exit(EXIT_CODE)


if where == "save":
    save_optimizer = CompressionDistillationTrainer._save_optimizer_and_scheduler

    def dying_save(self, output_dir):
        if self.state.global_step == at_step:
            os._exit(EXIT_CODE)
        save_optimizer(self, output_dir)

    CompressionDistillationTrainer._save_optimizer_and_scheduler = dying_save

main(sys.argv[1:], callbacks=[DieAtStep()] if where == "step" else None)
