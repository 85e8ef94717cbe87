"""The benchmarks `python -m benchmarks.NAME` (make bench): figures printed, never asserted."""
import resnet_diagnostics

resnet_diagnostics.start_command()  # before anything of ours is imported
