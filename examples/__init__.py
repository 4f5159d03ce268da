"""Runnable examples; importable so tests can reuse the example MoE model."""
