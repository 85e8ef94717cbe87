"""The batches the trainer and the analyses use, made from a dataset's uint8 images (train/datasets.py reads them):
normalised, augmented as training augments them, shuffled and sharded for training, in fixed order for evaluation,
and the images BN recalibration and the monitor's probe read.

Training batches are made on the device from a device-resident uint8 copy of the dataset: crop, flip and
cutout for the whole batch at once, as the fastest CIFAR trainers (airbench) do; there is no per-image Python
on the hot path. AutoAugment's policy is per image, so that preset runs the policy in DataLoader workers and
the rest on the device.
"""
from functools import lru_cache

import torch
import torch.nn.functional as F

from .datasets import DatasetSpec, Images
from .errors import UserError

AUGMENTATIONS = ("none", "crop-flip", "cutout", "autoaugment")


@lru_cache(maxsize=None)
def _channel_statistics(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a tensor built from Python numbers is a blocking copy to a GPU."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)


def normalise(images: torch.Tensor, spec: DatasetSpec, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32, standardised with the dataset's per-channel mean and std."""
    mean, std = _channel_statistics(tuple(spec.mean), tuple(spec.std), images.device)
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def check_augmentation(augmentation: str, side: int) -> None:
    """Every augmentation but none crops from images padded by at least one pixel (`augment`). Of a 1x1 image's
    9 crops, 8 are padding only, so most batches are many copies of one blank image: BN's batch variance is then
    (nearly) 0, and its backward divides the gradient by sqrt(variance + eps), ~300x at each BN layer, until it
    overflows and the loss turns NaN (resnet20 at step 2). Larger images always keep part of the image."""
    if side == 1 and augmentation != "none":
        raise UserError(f"--augment {augmentation} crops 1x1 images from a 1-pixel padding, so 8 of 9 crops are "
                        "blank and BN's gradient on a batch of blanks overflows to NaN; give --image-size 2 or more, or "
                        "--augment none")


def augment(images: torch.Tensor, spec: DatasetSpec, augmentation: str, generator: torch.Generator,
            channels_last: bool = False) -> torch.Tensor:
    """A whole uint8 batch at once: zero-pad by 1/8 of the side and take a random crop of the original size,
    flip horizontally, then normalise and, for `cutout`, zero a square of half the side (clipped at the border)
    of the normalised image, as DeVries & Taylor. At 32x32 that is CIFAR's recipe: pad 4, a 16x16 square."""
    if augmentation == "none":
        return normalise(images, spec, channels_last)
    n, _, height, width = images.shape
    device = images.device
    pad = max(1, round(min(height, width) / 8))
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
    channels = torch.arange(images.shape[1], device=device)[None, :, None, None]
    cropped = padded[torch.arange(n, device=device)[:, None, None, None], channels, rows, cols]
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    flipped = torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
    x = normalise(flipped, spec, channels_last)
    if augmentation == "cutout":
        cy = torch.randint(0, height, (n, 1, 1, 1), device=device, generator=generator)
        cx = torch.randint(0, width, (n, 1, 1, 1), device=device, generator=generator)
        ys = torch.arange(height, device=device).view(1, 1, -1, 1)
        xs = torch.arange(width, device=device).view(1, 1, 1, -1)
        half = max(1, round(min(height, width) / 4))
        inside = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
        x = x.masked_fill(inside, 0.0)
    return x


class _AutoAugmented(torch.utils.data.Dataset):
    """torchvision's CIFAR-10 AutoAugment policy, one image at a time (run in DataLoader workers)."""

    def __init__(self, images: torch.Tensor):
        import torchvision.transforms as T
        self.images, self.policy = images, T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.policy(self.images[index])


class TrainBatches:
    """Shuffled, augmented, normalised training batches. The same (seed, epoch) gives the same batches, so a
    resumed run sees what an uninterrupted one would. With several processes each takes its share of the
    epoch's permutation (`rank::world_size`); `batch_size` is the global batch."""

    def __init__(self, data: Images, spec: DatasetSpec, batch_size: int, augmentation: str, device, seed: int,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False, workers: int = 0):
        if augmentation not in AUGMENTATIONS:
            raise UserError(f"unknown augmentation {augmentation!r}; choose one of: {', '.join(AUGMENTATIONS)}")
        if batch_size > len(data):
            raise UserError(f"the batch size {batch_size} is larger than the {len(data)} training images")
        self.spec, self.augmentation, self.device = spec, augmentation, torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last, self.workers = channels_last, workers
        self.local_batch = batch_size // world_size
        self.steps = len(data) // batch_size  # the last partial batch is dropped: every step sees B images
        self.labels = data.labels.to(self.device)
        if augmentation == "autoaugment":  # the policy runs on CPU in workers; the rest on the device
            self.images, self.policy_data = None, _AutoAugmented(data.images)
        else:
            self.images = data.images.to(self.device)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        order = order[self.rank::self.world_size][:self.steps * self.local_batch]
        # Each process its own crops and flips; the same (seed, epoch, rank) the same ones.
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + epoch + 7919 + 104_729 * self.rank)
        batches = order.view(self.steps, self.local_batch)
        on_device = batches.to(self.device)  # one copy an epoch: a copy a step would wait for the GPU each step
        for images, index in zip(self._uint8_batches(batches, on_device, epoch), on_device):
            x = augment(images, self.spec, "crop-flip" if self.augmentation == "autoaugment" else self.augmentation,
                        generator, self.channels_last)
            yield x, self.labels[index]

    def _uint8_batches(self, batches: torch.Tensor, on_device: torch.Tensor, epoch: int):
        if self.images is not None:
            for index in on_device:
                yield self.images[index]
            return
        loader = torch.utils.data.DataLoader(
            self.policy_data, batch_sampler=batches.tolist(), num_workers=self.workers,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 104_729 * (self.rank + 1)),
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for images in loader:
            yield images.to(self.device, non_blocking=True)


def augmented_once(data: Images, spec: DatasetSpec, augmentation: str, device, seed: int = 0,
                   channels_last: bool = False) -> torch.Tensor:
    """The images, normalised and augmented once as training augments them, from a generator of their own
    (`seed`): the same images every time, whose statistics are those the BN running statistics describe. The
    global random state is left as it was (AutoAugment's policy draws from it, inside `fork_rng`)."""
    if augmentation not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {augmentation!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    images = data.images
    if augmentation == "autoaugment":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = _AutoAugmented(images)
            images = torch.stack([policy[i] for i in range(len(images))])
    images = images.to(device)
    generator = torch.Generator(images.device).manual_seed(seed)
    return augment(images, spec, "crop-flip" if augmentation == "autoaugment" else augmentation, generator,
                   channels_last)


def even_batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`x` in ceil(N / batch_size) consecutive batches whose sizes differ by at most one: every image is used
    and no batch is much smaller than the others (BN in train mode normalises by each batch's statistics)."""
    if len(x) == 0:
        return []
    count = -(-len(x) // max(1, batch_size))
    return list(torch.tensor_split(x, count))


def recalibration_inputs(data: Images, spec: DatasetSpec, augmentation: str, batch_size: int, device,
                         channels_last: bool = False) -> list[torch.Tensor]:
    """What BN recalibration (PreciseBN) reads, for the trainer's `--precise-bn` and the diagnostics alike:
    `data` augmented once as the run trains (seed 0), in even batches of at most the per-device training batch."""
    return even_batches(augmented_once(data, spec, augmentation, device, 0, channels_last), batch_size)


class EvalBatches:
    """Fixed-order, normalised batches of a whole split, re-iterable; the data stay on the device."""

    def __init__(self, data: Images, spec: DatasetSpec, batch_size: int, device, channels_last: bool = False):
        if batch_size < 1:
            raise UserError(f"the batch size must be positive, not {batch_size}")
        self.spec, self.batch_size, self.channels_last = spec, batch_size, channels_last
        self.images, self.labels = data.images.to(device), data.labels.to(device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def n_images(self) -> int:
        return len(self.labels)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            yield normalise(self.images[start:stop], self.spec, self.channels_last), self.labels[start:stop]
