"""train/distill.py that, at the end of training, writes every rank's own copy of the trained projections
to `rank-<i>.safetensors` in the output folder, so that a test can check that DDP kept the copies equal."""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file
from transformers import TrainerCallback

from kvtrain.training.projections import ATTRIBUTE
from kvtrain.training.run import main


class DumpProjections(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        tensors = {k: v.detach().cpu().contiguous() for k, v in getattr(model, ATTRIBUTE).state_dict().items()}
        save_file(tensors, str(Path(args.output_dir) / f"rank-{PartialState().process_index}.safetensors"))


main(sys.argv[1:], callbacks=[DumpProjections()])
