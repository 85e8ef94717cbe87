"""The commands `python -m diagnostics.NAME`: an analysis, its netCDF dataset and its figure."""
import resnet_diagnostics

resnet_diagnostics.start_command()  # before anything of ours is imported
