"""Training throughput: the loop users write today against this project's trainer, same model, batch, optimiser.

- typical: torchvision's FashionMNIST dataset, a DataLoader with workers, RandomCrop(32, padding=4) and
  RandomHorizontalFlip on PIL images, fp32, contiguous tensors, plain SGD with momentum.
- ours: the trainer's own epoch function (`train.trainer.train_epoch`) on `TrainBatches`: the uint8 dataset
  resident on the device, crop and flip for the whole batch there, channels_last, fp32 or bf16 autocast.

Same process, same images, repetitions interleaved, median images per second. Run:
`python -m benchmarks.train_throughput [--models resnet56 plain56] [--steps 8] [--repeats 3] [--bf16]`.
"""
import argparse
import gzip
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T

import models
from train import data
from train.config import Config
from train.trainer import train_epoch

from .common import cpu_has_native_bf16, machine_line, synchronize


def torchvision_fashion_mnist(root: Path) -> torchvision.datasets.FashionMNIST:
    """torchvision's own dataset class over the same files our loader reads (unpacked where it wants them)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        found = data._find_idx(data.fashion_mnist_folders(data.default_data_dir()), stem)
        if found is None:
            raise SystemExit("error: Fashion-MNIST not found; run `make fashion-mnist` first")
        opener = gzip.open if found.suffix == ".gz" else open
        with opener(found, "rb") as source, open(raw / stem, "wb") as target:
            shutil.copyfileobj(source, target)
    spec = data.get_spec("fashion-mnist")
    transform = T.Compose([T.Pad(2), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(spec.mean, spec.std)])
    return torchvision.datasets.FashionMNIST(str(root), train=True, transform=transform)


def endless(loader):
    """The loader's batches epoch after epoch, so that its workers stay warm between measurements as they do
    within a user's epoch."""
    while True:
        yield from loader


def typical_loop(model, batches, batch_size: int, optimizer, device, steps: int) -> float:
    """Images per second of the loop in every tutorial."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def our_loop(model, batches, optimizer, device, amp_dtype, steps: int) -> float:
    """Images per second of `train.trainer.train_epoch` over one epoch of exactly `steps` batches."""
    config = Config(model="", dataset="fashion-mnist", out="", total_steps=10**9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    progress = type("Quiet", (), {"update": lambda self, n: None})()
    synchronize(device)
    started = time.perf_counter()
    train_epoch(model, optimizer, scheduler, scaler, nn.CrossEntropyLoss(), batches, 1, 0, config, autocast,
                progress)
    synchronize(device)
    return steps * batches.local_batch / (time.perf_counter() - started)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "plain20", "resnet56", "plain56", "resnet110",
                                                    "plain110"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=min(4, torch.get_num_threads()))
    p.add_argument("--bf16", action="store_true", help="also time bf16 on a CPU without native bf16")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with_bf16 = device.type == "cuda" or cpu_has_native_bf16() or args.bf16
    spec = data.get_spec("fashion-mnist")
    with tempfile.TemporaryDirectory() as root:
        dataset = torchvision_fashion_mnist(Path(root))
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             pin_memory=device.type == "cuda")
        typical_batches = endless(loader)
        images = data.load_split("fashion-mnist", "train", train_images=args.steps * args.batch_size)
        ours = data.TrainBatches(images, spec, args.batch_size, "crop-flip", device, seed=0, channels_last=True)
        print(machine_line(device))
        print(f"images/s, median of {args.repeats} interleaved repetitions of {args.steps} steps of batch "
              f"{args.batch_size}; typical loop with {args.workers} DataLoader workers")
        print(f"{'model':<10} {'typical fp32':>13} {'ours fp32':>10} {'ratio':>6} {'ours bf16':>10} {'ratio':>6}")
        summary = {}
        for name in args.models:
            variants = {"typical": None, "fp32": None} | ({"bf16": torch.bfloat16} if with_bf16 else {})
            nets = {key: models.build(name, in_channels=1).to(device) for key in variants}
            for key in ("fp32", "bf16"):
                if key in nets:
                    nets[key] = nets[key].to(memory_format=torch.channels_last)
            optimizers = {key: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) for key, net in nets.items()}
            measured = {key: [] for key in variants}
            for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
                for key, amp_dtype in variants.items():
                    if key == "typical":
                        rate = typical_loop(nets[key], typical_batches, args.batch_size, optimizers[key], device,
                                            args.steps)
                    else:
                        rate = our_loop(nets[key], ours, optimizers[key], device, amp_dtype, args.steps)
                    if repeat:
                        measured[key].append(rate)
            median = {key: statistics.median(values) for key, values in measured.items()}
            bf16 = (f"{median['bf16']:>10.0f} {median['bf16'] / median['typical']:>5.2f}x" if "bf16" in median
                    else f"{'-':>10} {'-':>6}")
            print(f"{name:<10} {median['typical']:>13.0f} {median['fp32']:>10.0f} "
                  f"{median['fp32'] / median['typical']:>5.2f}x {bf16}")
            summary[name] = median
    key_model = "resnet56" if "resnet56" in summary else next(iter(summary))
    result = summary[key_model]
    bf16_text = (f"ours bf16 {result['bf16'] / result['typical']:.2f}x" if "bf16" in result
                 else "bf16 not measured (this CPU has no native bf16)")
    print(f"summary: {key_model} on {device.type}: ours fp32 {result['fp32'] / result['typical']:.2f}x the typical "
          f"loop ({result['typical']:.0f} img/s), {bf16_text} (targets: fp32 1.2x, bf16 2x on CPU; 5x on a GPU)")


if __name__ == "__main__":
    main()
