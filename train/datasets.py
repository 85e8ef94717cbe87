"""Datasets by name, read whole as uint8 tensors on the CPU, and what a model trained on one needs to know of it
(`DatasetSpec`). The batches made of them are train/batches.py's.

Files are read by this module, not by torchvision's dataset classes: torchvision checks CIFAR's md5 sums (so
tests could not use tiny files in the real format) and unpickles with no restriction (so a planted file could
run code). torchvision is used for what it is good at: downloading, where the network allows.

A folder of one's own images, `folder:PATH`, is read in torchvision's `ImageFolder` layout (`PATH/train/CLASS/*`
with `PATH/val/CLASS/*` and/or `PATH/test/CLASS/*`, or `PATH/CLASS/*` alone as the training images), whole, with
PIL; its dataset statistics are measured over its training images (`folder_spec`).
"""
import gzip
import math
import os
import pickle
import struct
import warnings
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError, first_line

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
MINI_CIFAR10_LABELS = (0, 1, 2)  # airplane, automobile, bird
SYNTHETIC_SIZES = {"train": 1024, "test": 256}
SPLITS = ("train", "val", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FOLDER = "folder:"  # the prefix of an image folder's dataset name: `folder:/absolute/path`
GREY_MODES = ("1", "L", "LA")  # PIL modes read as one channel; every other 8-bit mode is read as RGB
MAX_IMAGE_SIZE = 4096  # pixels on a side, after resizing
MAX_IMAGE_PIXELS = MAX_IMAGE_SIZE**2  # an image file's declared size, before any decoding (Pillow's warns at 89M)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model trained on the dataset needs to know; stored in every checkpoint."""
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, of pixel values in [0, 1], over the training images
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "classes": list(self.classes)}

    def with_statistics(self, mean=None, std=None) -> "DatasetSpec":
        """The spec normalising with `mean` and `std` (one value per channel, std positive) where given."""
        if mean is None and std is None:
            return self
        if mean is None or std is None or len(mean) != self.in_channels or len(std) != self.in_channels:
            raise UserError(f"--mean and --std need {self.in_channels} value(s) each, for the dataset's channels")
        if not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
            raise UserError(f"--mean and --std must be finite and --std positive, not {list(mean)} and {list(std)}")
        return replace(self, mean=tuple(mean), std=tuple(std))

    @classmethod
    def from_dict(cls, values: dict) -> "DatasetSpec":
        """From `to_dict`'s form (a checkpoint's `dataset`, checked by train.schema.check_dataset)."""
        return cls(values["name"], values["num_classes"], values["in_channels"], values["image_size"],
                   tuple(values["mean"]), tuple(values["std"]), tuple(values["classes"]))


SPECS = {
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           CIFAR10_CLASSES),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            CIFAR100_CLASSES),
    # CIFAR-10's statistics: the three classes are a subset of the same photographs.
    "mini-cifar10": DatasetSpec("mini-cifar10", 3, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                                CIFAR10_CLASSES[:3]),
    # Measured over the 60,000 training images after padding 28x28 to 32x32 with zeros.
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 1, 32, (0.2190,), (0.3318,), FASHION_CLASSES),
    "synthetic": DatasetSpec("synthetic", 4, 3, 32, (0.5, 0.5, 0.5), (0.155, 0.155, 0.155),
                             ("stripes-horizontal", "stripes-vertical", "checkerboard", "rings")),
}


def is_folder(name: str) -> bool:
    return name.startswith(FOLDER)


def dataset_name(text: str) -> str:
    """A dataset name as given on a command line, checked: one of SPECS, or `folder:PATH` with PATH made
    absolute (a checkpoint then finds its folder from any working directory)."""
    if is_folder(text):
        path = text[len(FOLDER):]
        if not path.strip():
            raise UserError("--dataset folder: needs a path, e.g. --dataset folder:~/pictures")
        name = FOLDER + str(Path(path).expanduser().absolute())
        if len(name) > 200:  # what a checkpoint keeps of a name (train.schema)
            raise UserError(f"{name[len(FOLDER):]} is longer than the {200 - len(FOLDER)} characters a checkpoint "
                            "keeps of a folder's path; move it, or link it from a shorter path")
        return name
    if text not in SPECS:
        raise UserError(f"unknown dataset {text!r}; choose one of: {', '.join(SPECS)}, or folder:PATH for a folder "
                        "of images in ImageFolder's layout")
    return text


def check_image_size(name: str, image_size: int | None) -> None:
    """`--image-size` resizes an image folder's images, within MAX_IMAGE_SIZE; other datasets have their own."""
    if image_size is not None and not is_folder(name):
        raise UserError(f"--image-size resizes the images of an image folder (--dataset folder:PATH); {name} has "
                        "its own size: drop --image-size")
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be from 1 to {MAX_IMAGE_SIZE} pixels, not {image_size}")


def get_spec(name: str, image_size: int | None = None) -> DatasetSpec:
    """A named dataset's fixed spec, or an image folder's, measured over all its training images."""
    if is_folder(name):
        return folder_spec(name, load_split(name, "train", image_size=image_size))
    return SPECS[dataset_name(name)]


def default_data_dir() -> Path:
    return Path(os.environ.get("RESNET_DIAG_DATA") or "./data")  # set but empty is unset, not the working directory


def dataset_folders(name: str, data_dir: Path) -> list[Path]:
    """The folders a dataset's images are read from (some may not exist): a file changed, added or removed
    there may change the images."""
    if is_folder(name):
        return [Path(name[len(FOLDER):])]
    name = dataset_name(name)
    if name == "synthetic":
        return []
    if name == "fashion-mnist":
        return fashion_mnist_folders(data_dir)
    return [data_dir / CIFAR_FOLDERS["cifar10" if name == "mini-cifar10" else name]]


@dataclass
class Images:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> "Images":
        return Images(self.images[index], self.labels[index])


# ---------------------------------------------------------------------------------------------------------------
# Reading the files


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts of lists and numpy arrays) and refuses any other global."""
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own reconstructor, whatever its module
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as file:
            batch = _ArrayUnpickler(file, encoding="bytes").load()
        batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
        for key, value in batch.items():  # a view can claim far more than the file holds (zero strides)
            if isinstance(value, np.ndarray) and value.nbytes > size:
                raise ValueError(f"its {key!r} claims {value.nbytes:,} bytes in a file of {size:,}")
        if not isinstance(batch["data"], np.ndarray) or batch["data"].dtype != np.uint8 or batch["data"].size % 3072:
            raise ValueError("its data is not an array of 32x32 RGB images in bytes")
        data = np.ascontiguousarray(batch["data"]).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as exc:  # any defect of a file the user supplied is bad input, not a bug
        raise UserError(f"{path} is not a CIFAR batch file ({exc}); delete it and run again to download "
                        "a fresh copy") from None
    if len(data) != len(labels):
        raise UserError(f"{path} has {len(data)} images but {len(labels)} labels; delete it and download again")
    return data, labels


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # in the data directory


def _read_cifar(name: str, split: str, data_dir: Path, download: bool) -> Images:
    folder = CIFAR_FOLDERS[name]
    files, label_key = {
        "cifar10": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, "labels"),
        "cifar100": ({"train": ["train"], "test": ["test"]}, "fine_labels"),
    }[name]
    paths = [data_dir / folder / file for file in files[split]]
    if not all(path.is_file() for path in paths):
        _download(name, data_dir, download, f"{data_dir / folder}/ ({', '.join(files[split])})")
    parts = [_read_cifar_batch(path, label_key) for path in paths]
    images = torch.from_numpy(np.concatenate([data for data, _ in parts]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in parts]))
    return Images(images, labels)


IDX_MAX_BYTES = 64 << 20


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """An idx file (the MNIST format), gzipped or not."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as file:
            raw = file.read(IDX_MAX_BYTES + 1)  # a gzip bomb stops here
        if len(raw) > IDX_MAX_BYTES:
            raise ValueError(f"it holds more than {IDX_MAX_BYTES >> 20} MiB, more than Fashion-MNIST's 47 MiB")
        zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
        shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
        if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
            raise ValueError("its header is not that of a uint8 idx file")
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
        return data.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as exc:
        raise UserError(f"{path} is not a readable idx file ({exc}); replace it with the original") from None


def fashion_mnist_folders(data_dir: Path) -> list[Path]:
    return [data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    """The first readable copy: a folder we may not read is passed over as a missing one (Debian's copy, last,
    then still serves)."""
    for folder in folders:
        for path in (folder / stem, folder / f"{stem}.gz"):
            try:
                if path.is_file() and os.access(path, os.R_OK):
                    return path
            except PermissionError:
                break
    return None


def _read_fashion_mnist(split: str, data_dir: Path, download: bool) -> Images:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    folders = fashion_mnist_folders(data_dir)
    paths = [_find_idx(folders, stem) for stem in stems]
    if None in paths:
        _download("fashion-mnist", data_dir, download, " or ".join(f"{folder}/" for folder in folders) +
                  " (or: apt-get install dataset-fashion-mnist)")
        paths = [_find_idx(folders, stem) for stem in stems]
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise UserError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    images = torch.from_numpy(images.copy()).unsqueeze(1)
    return Images(F.pad(images, (2, 2, 2, 2)), torch.from_numpy(labels.astype(np.int64)))


def _download(name: str, data_dir: Path, download: bool, expected: str) -> None:
    """torchvision's download, which checks the archive's md5; offline, one line on what to do instead."""
    import torchvision.datasets as tvd
    dataset_class = {"cifar10": tvd.CIFAR10, "mini-cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100,
                     "fashion-mnist": tvd.FashionMNIST}[name]
    if download:
        before = {path for path in data_dir.rglob("*")} if data_dir.exists() else None
        try:
            for train in (True, False):
                dataset_class(root=str(data_dir), train=train, download=True)
            return
        except Exception:  # offline, a proxy, a full disk: all mean "not here"; say where it must go
            _remove_new_files(data_dir, before)
    raise UserError(f"{name} is not in {expected} and could not be downloaded; download it where the network "
                    f"allows (torchvision.datasets.{dataset_class.__name__}(root='{data_dir}', download=True)) "
                    "or point --data-dir at a folder that has it")


def _remove_new_files(data_dir: Path, before: set | None) -> None:
    """Undo a failed download: the partial archive and the folders it made, nothing that was there before."""
    if not data_dir.exists():
        return
    for path in sorted(data_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if before is None or path not in before:
            path.unlink() if path.is_file() else path.rmdir()
    if before is None:
        data_dir.rmdir()


def _synthetic(split: str) -> Images:
    """Four kinds of texture (horizontal or vertical stripes, a checkerboard, rings) of random frequency, phase
    and tint under noise: deterministic, tiny, learnable by a small CNN in a few epochs, and every class is
    invariant to the crop-flip augmentation."""
    n = SYNTHETIC_SIZES[split]
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = (torch.arange(n) % 4)[torch.randperm(n, generator=generator)]
    frequency = (0.5 + 0.4 * torch.rand(n, generator=generator))[:, None, None]
    phase = 2 * torch.pi * torch.rand(n, 2, generator=generator)
    centre = 8 + 16 * torch.rand(n, 2, generator=generator)
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    rows = torch.sin(frequency * y + phase[:, :1, None])
    cols = torch.sin(frequency * x + phase[:, 1:, None])
    radius = torch.hypot(y - centre[:, :1, None], x - centre[:, 1:, None])
    textures = torch.stack([rows, cols, rows * cols * 2, torch.sin(frequency * radius)], dim=1)
    texture = textures[torch.arange(n), labels]
    tint = 0.5 + 0.5 * torch.rand(n, 3, 1, 1, generator=generator)
    noise = 0.3 * torch.randn(n, 3, 32, 32, generator=generator)
    pixels = 0.5 + 0.25 * (tint * texture[:, None] + noise)
    return Images((pixels.clamp(0, 1) * 255).round().to(torch.uint8), labels)


@contextmanager
def _readable():
    try:
        yield
    except PermissionError as exc:  # a folder or file of the user's that we may not read: theirs to fix
        raise UserError(f"cannot read {exc.filename or 'the data'} (permission denied); give yourself read "
                        "permission (chmod -R u+rX) or point --data-dir or --dataset elsewhere") from None


@_readable()
def load_images(name: str, split: str, data_dir: Path | str | None = None, download: bool = True,
                image_size: int | None = None) -> Images:
    """The whole `train` or `test` split of a dataset (an image folder's also `val`) as uint8 tensors on the CPU.
    `image_size`: an image folder's images resized to this side (other datasets have their own)."""
    if is_folder(name):
        return _read_folder(name, split, image_size)
    name = dataset_name(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == "synthetic":
        return _synthetic(split)
    if name == "fashion-mnist":
        return _read_fashion_mnist(split, data_dir, download)
    images = _read_cifar("cifar10" if name == "mini-cifar10" else name, split, data_dir, download)
    if name == "mini-cifar10":
        images = images[torch.isin(images.labels, torch.tensor(MINI_CIFAR10_LABELS))]
    return images


def image_shape(name: str, image_size: int | None = None) -> tuple[int, int]:
    """(channels, side) of the images a model trained on the dataset takes: an image folder's from its training
    images' headers alone (no pixel decoded), so that a model is checked against them before any work."""
    if not is_folder(name):
        return SPECS[name].in_channels, SPECS[name].image_size
    with _readable():
        train = _image_files(_split_folder(_folder_root(name), "train"), folder_classes(name), "train")
        mode, side, _ = _folder_format(train, image_size)
    return len(mode), side


def load_split(name: str, split: str, data_dir=None, val_split: int = 0, train_images: int | None = None,
               download: bool = True, image_size: int | None = None) -> Images:
    """`train`: the training images minus the held-out last `val_split`, then the first `train_images` of
    them; `val`: the held-out images, or the test split when none are held out (as the paper's curves; an
    image folder's val/ folder); `test`: the test split. `image_size`: see `load_images`."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if split == "test" or (split == "val" and not val_split):
        return load_images(name, split if is_folder(name) else "test", data_dir, download, image_size)
    images = load_images(name, "train", data_dir, download, image_size)
    if val_split and not 0 < val_split < len(images):
        raise UserError(f"--val-split {val_split} must be between 0 and the {len(images)} training images")
    if split == "val":
        return images[len(images) - val_split:]
    images = images[:len(images) - val_split]
    if train_images is not None:
        if not 0 < train_images <= len(images):
            raise UserError(f"--train-images {train_images} must be between 1 and the {len(images)} "
                            "training images available")
        images = images[:train_images]
    return images


# ---------------------------------------------------------------------------------------------------------------
# Image folders


def _folder_root(name: str) -> Path:
    root = Path(name[len(FOLDER):])
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; --dataset folder:PATH names a folder of class folders "
                        "(PATH/train/CLASS/*.png and PATH/val/CLASS/*.png, or PATH/CLASS/*.png)")
    return root


def _split_folder(root: Path, split: str) -> Path:
    """`train`: PATH/train, or PATH itself where there is no PATH/train; `val` and `test`: PATH/val and
    PATH/test, either standing in for the other where only one exists."""
    if split == "train":
        return root / "train" if (root / "train").is_dir() else root
    for folder in (root / split, root / ("test" if split == "val" else "val")):
        if folder.is_dir():
            return folder
    raise UserError(f"{root} has no val/ or test/ folder of held-out images; add one, or hold out training "
                    "images with --val-split N")


def _class_folders(folder: Path) -> list[str]:
    """The class folders, sorted, as ImageFolder orders them (the position is the label)."""
    try:
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as exc:
        raise UserError(f"cannot read {folder} ({exc.strerror or exc})") from None


def folder_classes(name: str) -> tuple[str, ...]:
    """An image folder's class names: the folders of its training split, sorted."""
    folder = _split_folder(_folder_root(name), "train")
    classes = _class_folders(folder)
    if not classes:
        raise UserError(f"{folder} holds no class folders; put each class's images in a folder of its own "
                        f"({folder}/CLASS/image.png)")
    too_long = next((name for name in classes if len(name) > 200), None)
    if too_long is not None:
        raise UserError(f"{folder / too_long}: a class folder's name may have at most 200 characters; shorten it")
    return tuple(classes)


def _image_files(folder: Path, classes: tuple[str, ...], split: str) -> list[tuple[Path, int]]:
    """(file, label) of every image under each class folder (ImageFolder's extensions, in any case), sorted.
    A training class must have images; a held-out split may lack a class, not add one."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    unknown = sorted(set(_class_folders(folder)) - set(classes))
    if unknown:
        raise UserError(f"{folder / unknown[0]} is a class the training images ({', '.join(classes)}) do not have; "
                        "give every split the same class folders")
    files = []
    for label, name in enumerate(classes):
        found = sorted(path for path in (folder / name).rglob("*")
                       if path.suffix.lower() in IMG_EXTENSIONS and path.is_file())
        if not found and split == "train":
            raise UserError(f"{folder / name} holds no images ({' '.join(IMG_EXTENSIONS)}); add some or remove "
                            "the folder")
        files += [(path, label) for path in found]
    if not files:
        raise UserError(f"{folder} holds no images ({' '.join(IMG_EXTENSIONS)}) in its class folders")
    return files


@contextmanager
def _opened(path: Path):
    """A PIL image of `path`; whatever is wrong with the file becomes one line naming it."""
    from PIL import Image
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    if empty:
        raise UserError(f"{path} is empty, not an image; remove or replace it")
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning, past its own limit, is our refusal instead
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # lazy: the header only, so its declared size is checked first
                yield image
    except UserError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise _too_many_pixels(path) from None
    except Exception as exc:  # PIL raises many kinds; any defect of a user's file is bad input, not a bug
        raise UserError(f"{path} is not a readable image ({first_line(exc)}); remove or replace it") from None


def _folder_format(files: list[tuple[Path, int]], image_size: int | None) -> tuple[str, int, Path]:
    """(PIL mode, side, reference file) every image is read in: one channel ("L") when every training image
    is greyscale (PIL modes 1, L, LA), RGB otherwise (the mode's length is the channels); `image_size`, or else
    the first training image's side, which must be square."""
    modes, reference, side = set(), files[0][0], image_size
    for path, _ in files:
        with _opened(path) as image:
            modes.add(image.mode)
            if side is None:
                if image.width != image.height:
                    raise UserError(f"{path} is {image.width}x{image.height}, not square; give --image-size N to "
                                    "resize every image (shorter side to N, then the centre N x N)")
                side = image.width
    return ("L" if modes <= set(GREY_MODES) else "RGB"), side, reference


def _too_many_pixels(path: Path, size: tuple[int, int] | None = None) -> UserError:
    declared = f" is {size[0]}x{size[1]} pixels," if size else " declares"
    return UserError(f"{path}{declared} more than the {MAX_IMAGE_PIXELS:,} pixels ({MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE}) "
                     "an image may have (decoding it could take gigabytes); downscale it, or remove it")


def _read_image(path: Path, mode: str, side: int, resize: bool, reference: Path) -> np.ndarray:
    """One image as uint8 (C, side, side): converted to `mode` (alpha dropped); with `resize`, its shorter side
    bilinearly resized to `side` and the centre cropped, else it must be side x side already. Every size check is
    on the declared size, before the pixels are decoded; a JPEG is decoded already reduced towards `side` (draft),
    anything else must have at most MAX_IMAGE_PIXELS, so one image never takes more than ~0.3 GB."""
    from PIL import Image
    with _opened(path) as image:
        if image.mode.startswith(("I", "F")):  # I;16, I, F: PIL's 8-bit conversion clips them instead of scaling
            raise UserError(f"{path} has 16- or 32-bit pixels (PIL mode {image.mode}); only 8-bit images are read: "
                            "convert it to 8 bits per channel")
        if resize:
            image.draft(mode, (side, side))  # JPEG only: both sides stay >= side
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise _too_many_pixels(path, image.size)
        if not resize and image.size != (side, side):
            raise UserError(f"{path} is {image.width}x{image.height} but {reference} is {side}x{side}; give "
                            "--image-size N to resize every image to N x N")
        image = image.convert(mode)
    if resize:  # the centre square of the shorter side, straight to side x side: no full-size resized copy
        scale = side / min(image.size)
        width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
        left, top = (width - side) // 2 / scale, (height - side) // 2 / scale
        image = image.resize((side, side), Image.Resampling.BILINEAR,
                             box=(left, top, left + side / scale, top + side / scale))
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def available_memory() -> int:
    """Bytes of memory the system can give without swapping (Linux's MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_folder(name: str, split: str, image_size: int | None) -> Images:
    """A split of an image folder, whole, as uint8 tensors, its classes spread evenly over it (`_spread`). The
    split's size is known before any pixel is decoded: one that would take more than half the memory available
    is refused, and the images are written into it one at a time (no second, stacked copy)."""
    check_image_size(name, image_size)
    root, classes = _folder_root(name), folder_classes(name)
    train = _image_files(_split_folder(root, "train"), classes, "train")
    files = train if split == "train" else _image_files(_split_folder(root, split), classes, split)
    mode, side, reference = _folder_format(train, image_size)
    files = [files[i] for i in _spread([label for _, label in files])]
    shape = (len(files), len(mode), side, side)
    needed, available = math.prod(shape), available_memory()
    if needed > available // 2:
        raise UserError(f"the {split} images of {name[len(FOLDER):]} would need {needed / 2**20:,.0f} MiB as "
                        f"{len(files)} images of {shape[1]}x{side}x{side}, more than half of the "
                        f"{available / 2**20:,.0f} MiB of memory available; give a smaller --image-size, or fewer "
                        "images")
    images = np.empty(shape, dtype=np.uint8)
    for k, (path, _) in enumerate(files):
        images[k] = _read_image(path, mode, side, image_size is not None, reference)
    return Images(torch.from_numpy(images), torch.tensor([label for _, label in files]))


def _spread(labels: list[int]) -> list[int]:
    """An order of the images in which each class is spread evenly over the whole split (its k-th of n images at
    (k + 1/2) / n of the way), so that any first N (--train-images, --n-images) or last N (--val-split) hold
    the classes in proportion, as a shuffled dataset would; fixed, and with no random numbers."""
    counts, seen, keys = Counter(labels), Counter(), []
    for index, label in enumerate(labels):
        keys.append(((seen[label] + 0.5) / counts[label], label, index))
        seen[label] += 1
    return [index for *_, index in sorted(keys)]


def pixel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 images (N, C, H, W), of pixel values in [0, 1]: sums in
    exact integers, a chunk of images at a time."""
    channels = images.shape[1]
    count, sums, squares = images.numel() // channels, [0] * channels, [0] * channels
    for chunk in images.split(256):
        wide = chunk.to(torch.int64)
        sums = [a + b for a, b in zip(sums, wide.sum((0, 2, 3)).tolist())]
        squares = [a + b for a, b in zip(squares, wide.square().sum((0, 2, 3)).tolist())]
    mean = tuple(total / count / 255 for total in sums)
    std = tuple(math.sqrt(max(count * square - total * total, 0)) / count / 255
                for total, square in zip(sums, squares))
    return mean, std


def folder_spec(name: str, train: Images, mean=None, std=None) -> DatasetSpec:
    """An image folder's spec: its classes, its images' channels and side, and per-channel mean and std measured
    over `train` (its training images as read) unless `mean` and `std` are given."""
    measured_mean, measured_std = pixel_statistics(train.images)
    if (mean is None or std is None) and min(measured_std) == 0:
        raise UserError(f"the training images of {name[len(FOLDER):]} are constant in a channel (std 0), so they "
                        "cannot be normalised; give --mean and --std, or other images")
    _, channels, side, _ = train.images.shape
    classes = folder_classes(name)
    return DatasetSpec(name, len(classes), channels, side, measured_mean, measured_std, classes).with_statistics(
        mean, std)
