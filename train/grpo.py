"""GRPO under KV compression (open-r1 style entry point).

    accelerate launch --config_file configs/accelerate/ddp.yaml train/grpo.py \
        --config recipes/smollm2-135m/grpo/passkey.yaml [--field value ...]

On CPU: ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu.yaml train/grpo.py ...
"""

from __future__ import annotations

import torch.distributed as dist

from kvtrain.training.grpo.run import main

if __name__ == "__main__":
    try:
        main()
    finally:
        # A process group left for interpreter exit can abort a rank at shutdown (gloo).
        if dist.is_initialized():
            dist.destroy_process_group()
