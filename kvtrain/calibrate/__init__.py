"""Calibration: one streamed, checkpointed pass of statistics over plain forwards (`statistics`, `run`), the fits
(`fit`, `head_budgets`, `sensitivity`), written through `kvtrain.artifacts` under ``DIR/kv_compression/``.

Importing this package imports nothing else: the job is `kvtrain.calibrate.run.calibrate`, the command line
`kvtrain.calibrate.cli`.
"""
