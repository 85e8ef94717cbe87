"""What every benchmark prints about where it ran, and a device-agnostic clock barrier."""
import platform
from datetime import date

import torch

import models
from train.trainer import cpu_has_native_bf16

__all__ = ["cpu_has_native_bf16", "machine_line", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, " \
                f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}"
    return (f"# {date.today().isoformat()} resnet-diagnostics {models.__version__}, torch {torch.__version__}, "
            f"{where}")
