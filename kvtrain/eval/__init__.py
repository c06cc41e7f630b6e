"""Evaluation suites: how closely a compressed cache follows the full-cache model."""
