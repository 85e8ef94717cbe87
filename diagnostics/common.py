"""What every diagnostics command shares: inputs to models and images, output folder, atomic writes, exit codes.

A command is: `parser(...)` for its options, `collect_sources(args)` for its inputs, an analysis per
checkpoint, `analyses.common.combine` into one dataset, a figure, `write_outputs(...)`; `main_guard` turns
bad input into one line `error: ...` and exit code 2 (docs/design.md §5).
"""
import argparse
import fnmatch
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

import models
import resnet_diagnostics
from analyses.common import AUTOCAST, forward_hooks, preserved_state
from train import checkpoint as ckpt
from train import rundir
from train.batches import EvalBatches, recalibration_inputs
from train.config import Config, older_options
from train.datasets import (FOLDER, SPECS, SPLITS, DatasetSpec, Images, check_image_size, dataset_folders,
                            dataset_name, default_data_dir, folder_classes, get_spec, is_folder, load_split)
from train.errors import (ArgumentParser, UserError, finite_float, first_line, positive_float, positive_int,
                          run_command)
from train.progress import Progress, interval_seconds
from train.trainer import choose_device


INPUTS = {  # what a command's positional inputs may be: (metavar, help)
    "checkpoints": ("CHECKPOINT_OR_RUN", "checkpoint files (.pt) or run directories"),
    "models": ("CHECKPOINT_OR_RUN_OR_MODEL", "checkpoint files (.pt), run directories, or model names for an "
               "untrained model"),
    "runs": ("RUN_DIR", "run directories (the folders `python -m train --out` wrote)"),
}


def parser(name: str, description: str, *, inputs: str = "checkpoints", inputs_required: bool = True,
           n_images: int | None = 2000, batch_size: int | None = 256) -> ArgumentParser:
    """The options of docs/design.md §5. `inputs`: one of INPUTS; `inputs_required=False` where an option such as
    `--init MODEL` can stand in for them."""
    p = ArgumentParser(prog=resnet_diagnostics.prog(f"diagnostics.{name}"), description=description)
    p.set_defaults(command=name)
    metavar, what = INPUTS[inputs]
    p.add_argument("inputs", nargs="+" if inputs_required else "*", metavar=metavar, help=what)
    p.add_argument("--model", help="the model a foreign checkpoint (a bare state_dict) holds, e.g. resnet56, "
                   "torchvision:resnet18, timm:resnet18")
    p.add_argument("--state-prefix", metavar="PREFIX",
                   help="where a foreign checkpoint keeps the model's weights, e.g. model. for a LightningModule's "
                   "self.model (default: found in a Lightning .ckpt, none elsewhere)")
    p.add_argument("--dataset", type=_dataset_option, metavar="NAME",
                   help=f"the dataset of a foreign checkpoint: {', '.join(SPECS)}, or folder:PATH (a folder of images "
                   "in ImageFolder's layout); for a run trained on an image folder, the folder's new place")
    p.add_argument("--image-size", type=positive_int, metavar="N",
                   help="with --dataset folder:PATH for a foreign checkpoint: resize the images (shorter side to N, "
                   "then the centre N x N)")
    p.add_argument("--data-dir", default=str(default_data_dir()), help="where datasets live")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="val: the run's held-out images, or the test split where none were held out")
    p.add_argument("--n-images", type=positive_int, default=n_images,
                   help="the first N images of the split" + (f" (default {n_images})" if n_images else
                                                                " (default: all)"))
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"images per forward pass (default {batch_size or 'the run’s per-device training batch'})")
    p.add_argument("--mean", type=finite_float, nargs="+", help="normalisation mean of a foreign checkpoint")
    p.add_argument("--std", type=positive_float, nargs="+", help="normalisation std of a foreign checkpoint")
    p.add_argument("--epochs", default="all", help="which epochs of a run: all, last, or a list such as 5,10,20")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", help="output folder (default: diagnostics/ in the first input's run directory)")
    return p


def _dataset_option(text: str) -> str:
    try:
        return dataset_name(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def require_run_dirs(inputs: list[str], why: str, lightning: bool = False) -> None:
    """For commands that read a run's history: every input must be a run directory (`lightning`: or a Lightning
    log directory)."""
    for text in inputs:
        if not (rundir.is_run_dir(text) or lightning and rundir.is_lightning_dir(text)):
            what = ("is a checkpoint file" if Path(text).is_file() else "has no config.json" if Path(text).is_dir()
                    else "does not exist")
            where = " (or a Lightning log directory, lightning_logs/version_N)" if lightning else ""
            raise UserError(f"{text} {what}, not a run directory; {why}: give the folder `python -m train --out` "
                            f"wrote{where}")


@dataclass
class Run:
    """A run directory as the commands that read its history see it (curves, report): its files, and the model
    and dataset of its last checkpoint."""
    text: str  # as given, for the commands shown and the labels
    path: Path  # resolved
    history: dict[str, list]  # metrics.csv's columns
    config: dict  # config.json
    model_name: str
    model_kwargs: dict
    label: str
    spec: DatasetSpec

    @property
    def dataset(self) -> str:
        return self.spec.name

    @property
    def epochs(self) -> int:
        return len(self.history["epoch"])

    @property
    def precision(self) -> str:
        """What it trained in, on what ("bf16 on cpu"): a spike's size depends on it (the demo's plain20 lost 5.53
        nats at epoch 1 in bf16, 0.69 in fp32, on one CPU)."""
        precision, device = self.config.get("precision_used"), self.config.get("device_used")
        return f"{precision} on {device}" if precision and device else precision or "not recorded"


def read_run(text: str) -> Run:
    path = Path(text)
    history, config = rundir.read_metrics(path), rundir.read_config(path)
    loaded = ckpt.load(rundir.run_checkpoints(path)[-1])
    return Run(text, path.resolve(), history, config, loaded.name, loaded.kwargs, loaded.label, loaded.spec)


def run_split(dataset: str, config: dict, split: str, data_dir, image_size: int | None = None) -> Images:
    """A split as a run defined it: its held-out images (`val_split`), its first `train_images` (the training
    split), its images resized to its `image_size` (else `image_size`: a foreign checkpoint's --image-size)."""
    return load_split(dataset, split, data_dir, config.get("val_split", 0),
                      config.get("train_images") if split == "train" else None,
                      image_size=config.get("image_size") or image_size)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Source:
    """One model of the output: a run's checkpoints (its `epoch` axis), a single file, or a bare model name."""
    label: str
    paths: list[Path] = field(default_factory=list)
    run_dir: Path | None = None
    model_name: str | None = None
    whole_run: bool = False  # the run directory itself was given: its files may be re-listed while it trains


def _select_epochs(files: list[Path], selection: str, run_dir: Path) -> list[Path]:
    if selection == "all":
        return files
    if selection == "last":
        return files[-1:]
    wanted = integer_list(selection, "--epochs", "all, last or a list such as 5,10,20")
    chosen = [path for path in files if rundir.named_epoch(path) in wanted]
    if not chosen:
        raise UserError(f"{run_dir} has none of the epochs {selection}; it has {len(files)} epoch files")
    return chosen


def integer_list(text: str, option: str, what: str) -> list[int]:
    """The integers of a comma-separated list (5,10,20) given to `option`; one line saying what it must be where
    it is not one."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{option} must be {what}, not {text!r}") from None


def collect_sources(args, *, model_names: bool = False) -> list[Source]:
    """Resolve every input before any work, so a bad one fails fast and nothing is written.

    Files of the same run directory are one source (the model along `epoch`); an input named twice (a relative
    and an absolute path, a symlink, a run and one of its epoch files) counts once. A run's `best.pt` or
    `last.pt` given beside the run is a model line of its own ("RUN/best.pt"), since its epoch is one of the
    run's. Where sources share a label, their run directory's (or file's) name is used instead.
    """
    sources: dict[Path | str | tuple, Source] = {}
    for text in args.inputs:
        path = Path(text)
        if not path.exists() and model_names and is_model_name(text):
            sources[text] = Source(models.label(text, {}), model_name=text)
            continue
        if not path.exists():
            hint = " or a model name (see models.available())" if model_names else ""
            raise UserError(f"{path} does not exist; give a checkpoint file or a run directory{hint}")
        if rundir.is_run_dir(path) or rundir.is_lightning_dir(path):
            files = _select_epochs(rundir.run_checkpoints(path), args.epochs, path)
            key, run_dir = path.resolve(), path
        else:
            files = [path]
            run_dir = path.parent if rundir.is_run_dir(path.parent) else None
            key = run_dir.resolve() if run_dir is not None else path.resolve()
            if run_dir is not None and not rundir.EPOCH_FILE.match(path.name):
                key = (key, path.name)
        source = sources.setdefault(key, Source("", run_dir=run_dir))
        source.whole_run |= rundir.is_run_dir(path) or rundir.is_lightning_dir(path)
        known = {f.resolve() for f in source.paths}
        source.paths += [f for f in files if f.resolve() not in known]
    in_runs = {f.resolve() for key, source in sources.items() if not isinstance(key, tuple) for f in source.paths}
    sources = {key: source for key, source in sources.items()
               if not (isinstance(key, tuple) and source.paths[0].resolve() in in_runs)}
    for source in sources.values():
        if source.paths:
            source.paths.sort(key=_epoch_order)
            source.label = load_checkpoint(source.paths[0], args).label  # validates the first file now
    _distinct_labels(sources)
    return list(sources.values())


def is_model_name(text: str) -> bool:
    """A name of ours `models.build` knows (`resnet56`), or another library's (`torchvision:resnet18`, checked
    when built, so that a missing library or model is said in its own words)."""
    if models.is_external(text):
        return True
    try:
        models.canonical(text)
    except models.ModelError:
        return False
    return True


def _epoch_order(path: Path) -> tuple[bool, int]:
    """Epoch files by number, then the run's other files (last.pt, best.pt)."""
    epoch = rundir.named_epoch(path)
    return epoch is None, epoch or 0


def _distinct_labels(sources: dict) -> None:
    """Where sources share a label: the run directory's name (RUN/best.pt for a run's own best.pt or last.pt),
    or the file's; where those clash too, the path."""
    def short(key, source) -> str:
        if isinstance(key, tuple):
            return f"{source.run_dir.name}/{key[1]}"
        return source.run_dir.name if source.run_dir is not None else Path(str(key)).stem

    def long(key, source) -> str:
        return str(source.paths[0]) if isinstance(key, tuple) else str(source.run_dir or key)

    for rename in (short, long):
        labels = [source.label for source in sources.values()]
        for key, source in sources.items():
            if labels.count(source.label) > 1:
                source.label = rename(key, source)


def prepare(args, *, model_names: bool = False) -> tuple[torch.device, list[Source], Path]:
    """The device, the resolved inputs and the output folder: every check on the inputs, before any work."""
    device = choose_device(args.device)
    sources = collect_sources(args, model_names=model_names)
    return device, sources, output_dir(args, sources)


def checkpoints(sources: list[Source], args, device):
    """(source, loaded checkpoint) for every checkpoint of every source, in order, one in memory at a time.

    A run that is still training may replace a listed file (`--keep last` deletes the previous epoch's) before
    it is read: its files are then listed again and those not yet read taken in order, so a diagnostic of a
    live run reads what the run holds instead of failing."""
    for source in sources:
        pending, done, epochs = list(source.paths), set(), {}
        with Progress(len(pending), f"{args.command} {source.label}", unit="checkpoint") as progress:
            while pending:
                path = pending.pop(0)
                try:
                    loaded = load_checkpoint(path, args, device)
                except UserError:
                    if path.exists() or not source.whole_run:
                        raise
                    listed = _select_epochs(rundir.run_checkpoints(source.run_dir), args.epochs, source.run_dir)
                    pending = [f for f in listed if f.resolve() not in done and _epoch_order(f) > _epoch_order(path)]
                    progress.set_total(len(done) + len(pending))
                    continue
                done.add(path.resolve())
                _check_epoch(path, loaded, epochs)
                progress.update(1)
                yield source, loaded


def _check_epoch(path: Path, loaded: ckpt.Loaded, epochs: dict[int, Path]) -> None:
    """A model's epochs are distinct and an epoch file holds the epoch its name says: a copy of another epoch's
    file (`epoch_005.pt` holding epoch 2, `epoch_0002.pt` beside `epoch_002.pt`) is refused before any output."""
    if loaded.epoch is None:  # a foreign file: a source of its own
        return
    named = rundir.named_epoch(path)
    if named is not None and loaded.epoch != named:
        raise UserError(f"{path} holds epoch {loaded.epoch}, not the epoch {named} its name says; a "
                        "copy of another epoch's file? remove or rename it")
    if loaded.epoch in epochs:
        raise UserError(f"{path} and {epochs[loaded.epoch]} both hold epoch {loaded.epoch} of the same run; a copy? "
                        "remove one of them")
    epochs[loaded.epoch] = path


@dataclass
class Results:
    """Per-checkpoint datasets of one command and what `analyses.common.combine` needs to stack them."""
    datasets: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    plain: dict[str, bool] = field(default_factory=dict)  # label -> a network without skip connections

    def add(self, label: str, loaded: ckpt.Loaded, dataset) -> None:
        self.datasets.append(dataset)
        self.labels.append(label)
        self.epochs.append(epoch_of(loaded))
        self.plain[label] = loaded.kwargs.get("skip", True) is False

    def combined(self, definition: str, split: str | None, **extra):
        """One dataset along `model` and `epoch`, with the attrs of docs/design.md §4 over all checkpoints (the
        largest batch any of them used, where their analysis records one)."""
        from analyses.common import attrs, combine
        return combine(self.datasets, self.labels, self.epochs,
                       attrs(definition, split=split, **merged_attrs(self.datasets) | extra))


def merged_attrs(datasets: list) -> dict:
    """The per-checkpoint attrs of docs/design.md §4 over several checkpoints' datasets: each one's checkpoint, the
    datasets they read, the most images and the largest batch any of them records (left out where none does:
    `analyses.common.attrs` writes it as unknown)."""
    merged = {"checkpoint": [d.attrs["checkpoint"] for d in datasets],
              "dataset": sorted({d.attrs["dataset"] for d in datasets})}
    for key in ("n_images", "batch_size"):
        if values := [d.attrs[key] for d in datasets if d.attrs.get(key, "") != ""]:
            merged[key] = max(values)
    return merged


def untrained_spec(args, dataset: str) -> DatasetSpec:
    """The dataset bare model names are built for: `dataset`, an image folder's resized to --image-size."""
    check_image_size(dataset, args.image_size)
    return get_spec(dataset, args.image_size)


def check_untrained(sources: list[Source], spec: DatasetSpec) -> None:
    """Every bare model name takes `spec`'s images: a model that cannot (a ViT on CIFAR) is one line before any
    work, not a traceback in it."""
    for source in sources:
        if source.model_name is not None:
            models.check_input(source.model_name, {"num_classes": spec.num_classes}, spec.in_channels,
                               spec.image_size)


def load_checkpoint(path: Path, args, device="cpu") -> ckpt.Loaded:
    return ckpt.load(path, model_name=args.model, dataset=args.dataset, mean=args.mean, std=args.std,
                     image_size=getattr(args, "image_size", None), device=device,
                     state_prefix=getattr(args, "state_prefix", None))


def epoch_of(loaded: ckpt.Loaded) -> int:
    """The checkpoint's epoch; -1 where the file does not say (a foreign checkpoint)."""
    return loaded.epoch if loaded.epoch is not None else -1


IMAGE_CACHE_SPLITS = 4  # a command reads one or two splits of each run (--split, and train to recalibrate)
_IMAGES: OrderedDict = OrderedDict()  # the splits read last, the most recent at the end


def tree_fingerprint(folder: Path) -> list:
    """(path inside, size, modification time) of every file under `folder`: a file edited, replaced, added or
    removed changes it."""
    files = sorted(path for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else []
    return [[str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def folder_times(root: Path) -> tuple:
    """(path, modification time) of `root` and of every folder under it (a linked class folder by its target's
    time): a file added, removed or renamed in any of them changes it, and no image is stat-ed."""
    times = [(str(root), root.stat().st_mtime_ns)]
    for parent, folders, _ in os.walk(root):
        times += [(path, os.stat(path).st_mtime_ns) for path in (os.path.join(parent, name) for name in folders)]
    return tuple(sorted(times))


def dataset_identity(dataset: str, data_dir) -> tuple:
    """What a dataset's images are read from, as it stands now, so that a dataset rewritten in place is read
    again: each file of a named dataset's folders (a handful); of an image folder only its folders' times, since
    a stat of each of many thousands of images at every checkpoint would cost more than the reading it saves (an
    image rewritten under its own name is not seen)."""
    if is_folder(dataset):
        return folder_times(Path(dataset[len(FOLDER):]))
    data_dir = Path(data_dir if data_dir is not None else default_data_dir()).resolve()
    return tuple((str(folder), tuple(map(tuple, tree_fingerprint(folder))))
                 for folder in dataset_folders(dataset, data_dir))


def _split_images(loaded: ckpt.Loaded, args, split: str):
    """A split as the checkpoint's run defined it (its held-out images, its first --train-images, its image
    size), read once while its files stay as they are; the last IMAGE_CACHE_SPLITS splits are kept. An image
    folder is found from the checkpoint's dataset name (an absolute path), or --dataset folder:PATH, and must
    still hold the images the model was trained on: the same classes, channels and size."""
    config, spec = loaded.config or {}, loaded.spec
    image_size = config.get("image_size") or getattr(args, "image_size", None)
    if is_folder(spec.name) and folder_classes(spec.name) != spec.classes:
        raise UserError(f"{spec.name} has the classes {', '.join(folder_classes(spec.name))}, not the "
                        f"{', '.join(spec.classes)} {loaded.path} was trained on; point --dataset folder:PATH at "
                        "its images")
    key = (spec.name, split, config.get("val_split", 0), config.get("train_images"), image_size,
           dataset_identity(spec.name, args.data_dir))
    if key not in _IMAGES:
        images = run_split(spec.name, config, split, args.data_dir, image_size)
        if tuple(images.images.shape[1:]) != (spec.in_channels, spec.image_size, spec.image_size):
            raise UserError(f"the {split} images of {spec.name} are {'x'.join(map(str, images.images.shape[1:]))} "
                            f"(channels x height x width), but {loaded.path} was trained on {spec.in_channels}x"
                            f"{spec.image_size}x{spec.image_size}")
        _IMAGES[key] = images
        if len(_IMAGES) > IMAGE_CACHE_SPLITS:
            _IMAGES.popitem(last=False)
    _IMAGES.move_to_end(key)
    return _IMAGES[key]


def chosen_layers(loaded: ckpt.Loaded, patterns: list[str] | None, example: torch.Tensor) -> list[str]:
    """What `diagnostics.responses` measures: the modules whose names match `patterns` (fnmatch's * and ?), in
    forward order, or else `models.response_layers`. Each must run exactly once in a forward pass of `example`
    (a module shared by several layers, as torchvision's `relu` of a block, mixes their activations); a model
    without any such layer is refused in one line."""
    model = loaded.model
    if patterns:
        names = [name for name, _ in model.named_modules() if name and any(fnmatch.fnmatchcase(name, pattern)
                                                                            for pattern in patterns)]
        if not names:
            raise UserError(f"no module of {loaded.label} matches --layers {' '.join(patterns)}; its convolutions are "
                            f"named {_some_convolutions(model)}")
    else:
        names = models.response_layers(model)
        if not names:
            raise UserError(f"{loaded.label} has no 3x3 convolution followed directly by BatchNorm, so it has no "
                            "responses in the sense of the paper's Fig. 7; name the modules to measure with --layers "
                            f"PATTERN (its convolutions are named {_some_convolutions(model)})")
    calls = dict.fromkeys(names, 0)
    hooks = {name: (lambda module, inputs, output, name=name: calls.__setitem__(name, calls[name] + 1))
             for name in names}
    with torch.no_grad(), preserved_state(model, bn_statistics=False), forward_hooks(model, hooks):
        model.eval()
        model(example[:1].to(next(model.parameters()).device))
    wrong = next(((name, count) for name, count in calls.items() if count != 1), None)
    if wrong is not None:
        raise UserError(f"{wrong[0]} of {loaded.label} runs {wrong[1]} times in one forward pass, so it has no "
                        "response of its own (a module that is shared, or unused); choose modules that run once")
    return names


def _some_convolutions(model) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") if names else "(none)"


def batch_size_of(loaded: ckpt.Loaded, args) -> int:
    """--batch-size, else the batch each device trained with: what BN in train mode normalises over."""
    return args.batch_size or (loaded.config or {}).get("per_device_batch") or 256


def image_batches(loaded: ckpt.Loaded, args, device, n_images: int | None = None) -> EvalBatches:
    """The first `--n-images` of `--split`, normalised with the checkpoint's own statistics, on `device`."""
    images = _split_images(loaded, args, args.split)
    n_images = n_images or args.n_images
    if n_images is not None:
        images = images[:n_images]
    return EvalBatches(images, loaded.spec, batch_size_of(loaded, args), device)


def run_dtype(loaded: ckpt.Loaded) -> torch.dtype | None:
    """The autocast dtype the checkpoint's run trained in (None: fp32, or a file that does not say)."""
    return AUTOCAST.get((loaded.config or {}).get("precision_used"))


def read_monitor(run_dir: Path):
    """A run's monitor.nc (the trainer's BN monitor), or None where the run has none; a damaged one is one line."""
    import xarray as xr
    path = Path(run_dir) / "monitor.nc"
    if not path.is_file():
        return None
    try:
        return xr.load_dataset(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"{path} cannot be read ({first_line(exc)}); delete it or copy the run again") from None


def run_recal_images(config: dict | None) -> int:
    """How many training images the run of this config (a checkpoint's, or config.json) had its attribution
    recompute BN statistics over (`--precise-bn`'s, else `--recalibration-images`; a run of an older version as
    `train.config.older_options` reads it), so that a diagnosis recomputes them as the trainer did and its
    recalibrated loss is the epoch line's on the same images; the trainer's default for a run that records
    neither."""
    values = older_options(config or {})
    for key in ("precise_bn", "recalibration_images"):
        n = values.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return Config.recalibration_images


def run_recal_inputs(loaded: ckpt.Loaded, args, device, n_images: int) -> list:
    """What BN recalibration reads, exactly as the trainer's --precise-bn (`train.batches.recalibration_inputs`):
    the first `n_images` of the run's training images, augmented once as the run trained, in even batches of at
    most the per-device training batch; recalibrate under `run_dtype(loaded)`."""
    config = loaded.config or {}
    images = _split_images(loaded, args, "train")[:n_images]
    batch_size = config.get("per_device_batch") or batch_size_of(loaded, args)
    return recalibration_inputs(images, loaded.spec, config.get("augment", "none"), batch_size, device)


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def output_dir(args, sources: list[Source]) -> Path:
    """--out, else `diagnostics/` in the first input's run directory, else ./diagnostics/; checked writable
    now, created only when the results are written."""
    if args.out:
        out = Path(args.out)
    else:
        run_dir = sources[0].run_dir if sources else None
        out = run_dir / "diagnostics" if run_dir is not None else Path("diagnostics")
    ckpt.check_writable(out)
    return out


def write_outputs(out: Path, name: str, dataset, figure) -> None:
    """`<name>.nc` and, for each figure, `<name>.png` and `<name>.pdf` (`figure` is one figure, or a dict of
    them by suffix: "" for the main one, "repair" for `<name>_repair.png`...): all written to temporary files
    first and then moved into place together, so an error leaves none of them half-written and two commands
    writing the same names leave one command's set, not a mix. Prints the paths."""
    import matplotlib.pyplot as plt

    from .plotting import save
    figures = figure if isinstance(figure, dict) else {"": figure}
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.nc"]
    for suffix in figures:
        stem = f"{name}_{suffix}" if suffix else name
        paths += [out / f"{stem}.png", out / f"{stem}.pdf"]
    rundir.remove_stale_temporaries(out, [path.name for path in paths])  # what a killed run of this left
    try:
        with ckpt.atomic_paths(paths) as temporaries:  # another command writing them too: its set or ours, whole
            dataset.to_netcdf(temporaries[0], engine="netcdf4")
            for k, fig in enumerate(figures.values()):
                save(fig, temporaries[1 + 2 * k], "png")
                save(fig, temporaries[2 + 2 * k], "pdf")
    except BaseException:
        for folder in created:  # innermost first: leave no empty folder behind
            folder.rmdir()
        raise
    finally:
        for fig in figures.values():
            plt.close(fig)
    for path in paths:
        print(path)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns as wide as their widest cell: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in [header, *rows])


def main_guard(main) -> int:
    """Run `main()` as a command (`train.errors.run_command`), figures to files only (outputs are written whole at
    the end or not at all, so an interruption leaves nothing)."""
    from .plotting import use_file_backend
    use_file_backend()

    def checked():
        interval_seconds()  # a bad RESNET_DIAG_PROGRESS_SECONDS is one line before any work
        main()
    return run_command(checked)
