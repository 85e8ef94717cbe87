"""Data, checkpoints and the trainer (`python -m train`). Imports `models` and `analyses` (the BN monitor,
recalibration and the evaluation pass the diagnostics share)."""
import resnet_diagnostics

resnet_diagnostics.start_command()  # before anything of ours is imported
