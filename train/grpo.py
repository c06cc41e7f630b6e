"""GRPO under KV compression (open-r1 style entry point).

    accelerate launch --config_file configs/accelerate/ddp.yaml train/grpo.py \
        --config recipes/smollm2-135m/grpo/passkey.yaml [--field value ...]

On CPU: ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu.yaml train/grpo.py ...
A user error (a bad recipe key, an unknown reward, a reward that fails, an output folder in use) is one line from
the first rank, with no stack trace unless KVTRAIN_DEBUG=1.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from kvtrain.errors import debug_requested, run_entry_point
from kvtrain.training.grpo.run import main

if __name__ == "__main__":
    try:
        code = run_entry_point(main, prog="train/grpo.py", debug=debug_requested())
    finally:
        # A process group left for interpreter exit can abort a rank at shutdown (gloo: "terminate called
        # without an active exception"), failing a run that trained and saved correctly.
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
