"""Data: real on-disk formats read by the real loaders, batch augmentation, determinism, offline errors."""
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_images, write_cifar_batch, write_idx
from train import datasets
from train.batches import EvalBatches, TrainBatches, augment
from train.errors import UserError


def test_cifar10_files_in_the_real_format(cifar10_dir):
    train = datasets.load_images("cifar10", "train", cifar10_dir, download=False)
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:20], torch.from_numpy(tiny_images(20, 1)))  # batch 1 first, pixel-exact
    assert train.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert len(datasets.load_images("cifar10", "test", cifar10_dir, download=False)) == 30


def test_mini_cifar10_keeps_airplane_automobile_bird(cifar10_dir):
    mini = datasets.load_images("mini-cifar10", "train", cifar10_dir, download=False)
    assert len(mini) == 30 and set(mini.labels.tolist()) == {0, 1, 2}
    assert datasets.get_spec("mini-cifar10").classes == ("airplane", "automobile", "bird")


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar_batch(folder / "train", tiny_images(10, 0), [99 - i for i in range(10)], b"fine_labels")
    write_cifar_batch(folder / "test", tiny_images(5, 1), list(range(5)), b"fine_labels")
    train = datasets.load_images("cifar100", "train", tmp_path, download=False)
    assert train.labels.tolist() == list(range(99, 89, -1))
    assert len(datasets.get_spec("cifar100").classes) == 100


def test_a_cifar_file_that_would_run_code_is_refused(cifar10_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(cifar10_dir / "cifar-10-batches-py" / "data_batch_3", "wb") as file:
        pickle.dump({b"data": Exploit(), b"labels": []}, file, protocol=2)
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR batch file"):
        datasets.load_images("cifar10", "train", cifar10_dir, download=False)
    assert not marker.exists()


def test_fashion_mnist_gz_idx_padded_to_32(fashion_dir):
    train = datasets.load_images("fashion-mnist", "train", fashion_dir, download=False)
    assert train.images.shape == (40, 1, 32, 32)
    assert train.images[:, :, :2].sum() == 0 and train.images[:, :, :, -2:].sum() == 0  # 2-pixel zero border
    assert train.labels.tolist()[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_fashion_mnist_unpacked_in_torchvisions_folder(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", np.full((3, 28, 28), 7))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2, 3]))
    test = datasets.load_images("fashion-mnist", "test", tmp_path, download=False)
    assert test.images[:, :, 2:30, 2:30].eq(7).all() and test.labels.tolist() == [1, 2, 3]


def test_missing_dataset_offline_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UserError) as error:
        datasets.load_images("fashion-mnist", "train", tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path / "fashion-mnist") in message and "apt-get install dataset-fashion-mnist" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="cifar-10-batches-py.*--data-dir"):
        datasets.load_images("cifar10", "test", tmp_path, download=False)


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(UserError, match="could not be downloaded"):
        datasets.load_images("cifar10", "train", tmp_path, download=True)


def test_splits_and_train_images():
    train = datasets.load_split("synthetic", "train", val_split=200, train_images=100)
    val = datasets.load_split("synthetic", "val", val_split=200)
    full = datasets.load_images("synthetic", "train")
    assert torch.equal(train.images, full.images[:100]) and torch.equal(val.images, full.images[-200:])
    assert torch.equal(datasets.load_split("synthetic", "val").images, datasets.load_images("synthetic", "test").images)
    with pytest.raises(UserError, match="--train-images"):
        datasets.load_split("synthetic", "train", train_images=5000)


def test_synthetic_is_deterministic_and_balanced():
    a, b = datasets.load_images("synthetic", "train"), datasets.load_images("synthetic", "train")
    assert torch.equal(a.images, b.images) and a.labels.bincount().tolist() == [256] * 4


def test_crop_flip_is_a_translation_with_zero_padding_and_a_flip():
    spec = datasets.get_spec("synthetic")
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    generator = torch.Generator().manual_seed(0)
    x = augment(images, spec, "crop-flip", generator)
    pixels = (x * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)) * 255
    pixels = pixels.round().to(torch.uint8)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(len(images)):
        candidates = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(pixels[i], c) for c in candidates)


def test_cutout_zeroes_a_clipped_16x16_square_of_the_normalised_image():
    spec = datasets.get_spec("synthetic")
    images = torch.full((200, 3, 32, 32), 255, dtype=torch.uint8)
    x = augment(images, spec, "cutout", torch.Generator().manual_seed(1))
    zeros = (x == 0).all(1).sum((1, 2))
    assert zeros.max() == 256 and zeros.min() >= 64  # a corner centre clips the square to 8x8
    assert (x != 0).any()


def indexed_images(n: int) -> datasets.Images:
    """Blank images whose first two pixels of channel 0 spell their index (low byte, high byte)."""
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    return datasets.Images(images, torch.arange(n) % 4)


def image_indices(x: torch.Tensor, spec: datasets.DatasetSpec) -> list[int]:
    """The indices `indexed_images` wrote, read back from normalised (un-augmented) batches."""
    pixels = (x[:, 0, 0, :2] * spec.std[0] * 255 + spec.mean[0] * 255).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def test_train_batches_are_deterministic_per_epoch():
    images = datasets.load_images("synthetic", "train")
    make = lambda: TrainBatches(images, datasets.get_spec("synthetic"), 128, "crop-flip", "cpu", seed=3)
    first, again = list(make().epoch(1)), list(make().epoch(1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], next(make().epoch(2))[0])
    assert len(first) == len(images) // 128 and first[0][0].shape == (128, 3, 32, 32)


def test_two_processes_share_each_step_of_one_process_between_them():
    # DDP averages the two ranks' gradients, which equals one process's gradient on the global batch only if
    # each step's images are the same: rank 0 and rank 1 take disjoint halves of the single process's step.
    images, spec = indexed_images(1000), datasets.get_spec("synthetic")
    make = lambda rank=0, world=1: TrainBatches(images, spec, 128, "none", "cpu", seed=3, rank=rank,
                                                world_size=world)
    single = [image_indices(x, spec) for x, _ in make().epoch(2)]
    ranks = [[image_indices(x, spec) for x, _ in make(rank, 2).epoch(2)] for rank in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 1000 // 128
    for step, (whole, first, second) in enumerate(zip(single, *ranks)):
        assert len(first) == len(second) == 64 and not set(first) & set(second), step
        assert sorted(first + second) == sorted(whole), step
    seen = [index for step in single for index in step]
    assert len(set(seen)) == len(seen) == 7 * 128  # no image twice in an epoch; the last partial batch dropped
    assert single != [image_indices(x, spec) for x, _ in make().epoch(3)]  # each epoch its own order


def test_autoaugment_runs_the_policy_in_workers():
    images = datasets.load_images("synthetic", "train")[:128]
    make = lambda augmentation: TrainBatches(images, datasets.get_spec("synthetic"), 64, augmentation, "cpu",
                                             seed=0, workers=1)
    state = torch.get_rng_state()
    policy = list(make("autoaugment").epoch(1))
    # AutoAugment draws from torch's global generator: here it stayed untouched, so the policy ran elsewhere.
    assert torch.equal(torch.get_rng_state(), state)
    # Same order and the same crops and flips as crop-flip alone (one generator): what differs is the policy's.
    plain = list(make("crop-flip").epoch(1))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(policy, plain))
    changed = torch.cat([(a[0] != b[0]).flatten(1).any(1) for a, b in zip(policy, plain)])
    assert changed.float().mean() > 0.5  # 100 of 128 here; some sub-policies rarely fire
    again = list(make("autoaugment").epoch(1))  # the workers are seeded from the run's seed and epoch
    assert all(torch.equal(a[0], b[0]) for a, b in zip(policy, again))
    assert len(policy) == 2 and policy[0][0].shape == (64, 3, 32, 32) and torch.isfinite(policy[0][0]).all()


def test_eval_batches_cover_the_split_in_order():
    images = datasets.load_images("synthetic", "test")
    batches = EvalBatches(images, datasets.get_spec("synthetic"), 100, "cpu")
    labels = torch.cat([y for _, y in batches])
    assert len(batches) == 3 and torch.equal(labels, images.labels)


@pytest.mark.parametrize("content, phrase", [
    (gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 12, mtime=0)[:-12] + b"\xff" * 12, "not a readable idx file"),
    (gzip.compress(b"\x00" * (65 << 20), mtime=0), "more than 64 MiB"),
], ids=["damaged stream", "gzip bomb"])
def test_a_damaged_or_inflating_idx_file_is_one_line(tmp_path, content, phrase):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(UserError, match=phrase):
        datasets._read_idx(path, 3)


def test_an_unreadable_data_folder_is_passed_over_or_one_line(fashion_dir, tmp_path, monkeypatch):
    """Fashion-MNIST in a folder we may not read: Debian's copy is tried next; CIFAR there: one line, no
    PermissionError traceback. (Root reads through permissions, so the refusal is planted in Path.is_file.)"""
    locked = tmp_path / "locked"
    is_file = Path.is_file

    def refusing(path):
        if locked in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)
    monkeypatch.setattr(Path, "is_file", refusing)
    (locked / "fashion-mnist").mkdir(parents=True)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", fashion_dir / "fashion-mnist")
    assert len(datasets.load_images("fashion-mnist", "train", locked, download=False)) == 40
    with pytest.raises(UserError, match=r"cannot read .*locked.* \(permission denied\)"):
        datasets.load_images("cifar10", "train", locked, download=False)
