"""Calibration: statistics from plain forwards, fitted projections / bit plans / query statistics / head
budgets, written as artifacts under ``DIR/kv_compression/`` and loaded back with `load_artifacts`."""

from __future__ import annotations

from kvtrain.calibrate.artifacts import CalibrationArtifacts, load_artifacts
from kvtrain.calibrate.cli import add_calibrate_parser
from kvtrain.calibrate.fit import METHODS, Projections, RankChoice, fit_projections
from kvtrain.calibrate.run import FITS, CalibrationSettings, calibrate

__all__ = [
    "FITS",
    "METHODS",
    "CalibrationArtifacts",
    "CalibrationSettings",
    "Projections",
    "RankChoice",
    "add_calibrate_parser",
    "calibrate",
    "fit_projections",
    "load_artifacts",
]
