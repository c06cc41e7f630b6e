"""GRPO under KV compression: rollouts sampled through the compressed cache, trained on the exact replay of each
rollout's keep-sets.

`kvtrain.training.grpo.run` is the pipeline behind `train/grpo.py` (parse -> build -> train -> save); the trainer
is `kvtrain.training.grpo.trainer`, the rollouts and their keep-set batches `kvtrain.training.grpo.rollouts`, the
reward registry `kvtrain.training.grpo.rewards`, the built-in tasks `kvtrain.training.grpo.tasks`.
"""
