"""Compression-aware distillation: the student under replayed KV compression learns the full-cache teacher.

The pipeline behind `train/distill.py` is `kvtrain.training.run` (parse -> build -> train -> save); the trainer
is `kvtrain.training.trainer`, the loss `kvtrain.training.losses`.
"""
