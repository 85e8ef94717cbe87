"""Data, checkpoints and the trainer (`python -m train`). Imports `models` only."""
