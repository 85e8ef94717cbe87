"""The benchmarks `python -m benchmarks.NAME` (make bench): figures printed, never asserted."""
import resnet_diagnostics

resnet_diagnostics.own_modules_first()  # before anything of ours is imported
