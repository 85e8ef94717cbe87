"""`python -m diagnostics.report RUN [RUN ...] [--out DIR] [--sections NAME ...]`: one page for a set of runs.

Each section is one diagnostic, run through its own command line (its `main(argv)`) into DIR, or reused where an
earlier report made it there for the same checkpoints and options. Its figure, tables, verdicts, definition, the
command that reproduces it and its provenance go into DIR/report.html (one file: figures inline as base64 PNG,
styles inline, no script, nothing from the network, so it opens from disk and can be mailed) and DIR/report.pdf
(the same figures and text on A4 pages, drawn with matplotlib: no browser is needed to make it, so it is made
wherever the report is).

Reuse: next to each `<name>.nc` the report writes `<name>.command.json` with the command, the key it was made
for (the command with absolute paths, the software and its git commit, the size and modification time of every
file of the runs the diagnostics read, and for a section that reads images the resolved data directory and the
size and modification time of every file in the dataset's folders) and the SHA-256 of every file it made (.nc,
.png, .pdf). A section is reused when its key is the same and each of its files is still the one made for it.
A diagnostic run by hand leaves no such record, so the report makes its section again.

Two commands writing into one --out: each section is made in a private folder there and its files, record
included, moved in together under a lock on the folder (and read back under it), so the folder holds one
command's whole set, never a mix.
"""
import base64
import contextlib
import functools
import hashlib
import importlib
import io
import json
import shlex
import struct
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

import jinja2
import numpy as np
import xarray as xr

import models
import resnet_diagnostics
from analyses.common import software
from analyses.monitor import prescription
from train import checkpoint as ckpt
from train import rundir
from train.datasets import SPLITS, dataset_folders, default_data_dir
from train.errors import BAD_INPUT, ArgumentParser, DiskFull, UserError, first_line, interrupted_exit_code, positive_int
from train.progress import Progress
from train.trainer import choose_device

from . import attributions, common, curves, evaluate, flops

IMAGES = ("data_dir", "device", "split", "n_images", "batch_size")  # the options a section that reads images takes
RUN_FILES = ("config.json", "metrics.csv", "steps.csv", "monitor.nc")  # and the checkpoints (*.pt)


# ---------------------------------------------------------------------------------------------------------------
# The sections


def verdicts(ds: xr.Dataset) -> list[str]:
    return as_list(ds.attrs.get("verdict", []))  # netCDF hands a list of one string back as the string


def last_epoch(runs) -> list[str]:
    return ["--epochs", "last"]


def with_initial_models(runs) -> list[str]:
    """The last epoch, and each run's model untrained where `--init NAME` builds exactly that model."""
    names = dict.fromkeys(name for name in map(initial_model, runs) if name is not None)
    return ["--epochs", "last", *(part for name in names for part in ("--init", name))]


@dataclass(frozen=True)
class Section:
    name: str  # the diagnostic's module, and the stem of the files it writes
    title: str
    question: str
    passes: tuple[str, ...] = IMAGES  # the report's options it is given, where the user gave them
    options: Callable[[list], list[str]] = lambda runs: []
    tables: Callable[[xr.Dataset], list[str]] = lambda ds: []
    notes: Callable[[xr.Dataset], list[str]] = lambda ds: []
    monitor: bool = False  # also summarise each run's BN monitor (monitor.nc)


SECTIONS = {section.name: section for section in (
    Section("curves", "Training curves", "How did training and validation loss and accuracy go, and how do the "
            "runs compare?", passes=(),
            tables=lambda ds: [common.format_table(curves.SUMMARY_HEADER, curves.summary_rows(ds))]),
    Section("evaluate", "Evaluation", "Loss, accuracy and the weakest class of each run's last checkpoint.",
            options=last_epoch,
            tables=lambda ds: [common.format_table(evaluate.TABLE_HEADER, evaluate.table_rows(ds))]),
    Section("responses", "Layer responses (He et al. 2016, Fig. 7)", "How strongly does each 3x3 layer respond, "
            "in the network's order and sorted?", options=last_epoch),
    Section("gradients", "Gradient norms by depth", "How large is the loss gradient of each layer's weight, "
            "trained and at initialisation?", options=with_initial_models),
    Section("spikes", "Validation-loss spikes", "Is a validation-loss spike in the BN running statistics or in "
            "the weights?", notes=verdicts, monitor=True),
    Section("flops", "FLOPs and parameters", "What does a forward pass cost, layer by layer?", passes=("device",),
            tables=lambda ds: [flops.table_text(ds)]),
    Section("attributions", "Attributions", "Where does each model look, and how faithful is each map?",
            passes=("data_dir", "device", "split", "batch_size"),
            tables=lambda ds: [attributions.table_text(ds)]),
)}


def parser() -> ArgumentParser:
    p = ArgumentParser(prog=resnet_diagnostics.prog("diagnostics.report"), description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help=common.INPUTS["runs"][1])
    p.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), metavar="SECTION",
                   help=f"only these sections, in the page's order: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--data-dir", metavar="DIR", help="where datasets live (passed on to the diagnostics)")
    p.add_argument("--split", choices=SPLITS, help="the split the diagnostics measure (each command's default: val)")
    p.add_argument("--n-images", type=positive_int, metavar="N", help="the first N images of the split, for the "
                   "sections that measure over it (evaluate, responses, gradients, spikes; each command's default "
                   "otherwise)")
    p.add_argument("--batch-size", type=positive_int, metavar="B",
                   help="images per forward pass (each command's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", metavar="DIR", help="the folder of report.html, report.pdf and every diagnostic's files "
                   "(default: diagnostics/ in the first run directory)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# The runs, checked before anything runs


def initial_model(run: common.Run) -> str | None:
    """The name `gradients --init` builds untrained as exactly this run's model, or None."""
    kwargs = {key: value for key, value in run.model_kwargs.items() if key not in ("num_classes", "in_channels")}
    return run.label if (run.label in models.available()
                         and models.canonical(run.label) == (run.model_name, kwargs)) else None


def check_data(runs: list[common.Run], args, sections: list[Section]) -> None:
    """Every split a section will read, loaded once now, as the diagnostics will load it: a dataset missing
    offline fails before any work."""
    if not any("data_dir" in section.passes for section in sections):
        return
    data_dir = args.data_dir or default_data_dir()
    splits = ("val_split", "train_images", "image_size")  # what a run's splits are made of
    for run in {(run.dataset, *map(run.config.get, splits)): run for run in runs}.values():
        for split in dict.fromkeys((args.split or "val", "train")):  # spikes recalibrates on training images
            common.run_split(run.dataset, run.config, split, data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Commands and what makes a section reusable


def arguments(section: Section, runs: list[common.Run], args, absolute: bool = False) -> list[str]:
    """The section's command line after `python -m diagnostics.NAME`, without --out."""
    argv = [str(run.path) if absolute else run.text for run in runs] + section.options(runs)
    for option in section.passes:
        value = getattr(args, option)
        if value is not None:
            value = Path(value).resolve() if absolute and option == "data_dir" else value
            argv += [f"--{option.replace('_', '-')}", str(value)]
    return argv


def fingerprint(run_dir: Path) -> list:
    """(name, size, modification time) of each file of the run a diagnostic reads."""
    files = [path for path in sorted(run_dir.iterdir())
             if path.is_file() and (path.name in RUN_FILES or path.suffix == ".pt")]
    return [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def data_identity(runs: list[common.Run], args) -> dict:
    """What the images a section reads are made from: the data directory as resolved now (--data-dir, else
    RESNET_DIAG_DATA, else ./data) and the files of each run's dataset folders."""
    data_dir = Path(args.data_dir or default_data_dir()).resolve()
    folders = dict.fromkeys(folder.resolve() for run in runs for folder in dataset_folders(run.dataset, data_dir))
    return {"data_dir": str(data_dir), "files": {str(folder): common.tree_fingerprint(folder) for folder in folders}}


def cache_key(section: Section, runs: list[common.Run], args, code_commit: str | None, data: dict | None) -> dict:
    """`data`: `data_identity`, part of the key of the sections that read images."""
    return {"argv": arguments(section, runs, args, absolute=True), "software": software(), "git_commit": code_commit,
            "inputs": {str(run.path): fingerprint(run.path) for run in runs},
            **({"data": data} if "data_dir" in section.passes else {})}


def record_path(out: Path, name: str) -> Path:
    return out / f"{name}.command.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unchanged(out: Path, name: str, key: dict) -> bool:
    """The record beside `<name>.nc` says it was made for `key`, and each file it made (its .nc and .png among
    them) is still the one made then."""
    try:
        record = json.loads(record_path(out, name).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(record, dict) or record.get("key") != key:
        return False
    hashes = record.get("sha256")
    if not isinstance(hashes, dict) or not {f"{name}.nc", f"{name}.png"} <= set(hashes):  # an older record: one hash
        return False
    return all(Path(file).name == file and (out / file).is_file() and sha256(out / file) == digest
               for file, digest in hashes.items())


# ---------------------------------------------------------------------------------------------------------------
# Making the sections


@dataclass
class Outcome:
    status: str  # made, reused, not made (the diagnostic refused these inputs), failed (a bug)
    note: str
    ds: xr.Dataset | None = None  # made or reused: its dataset and figure, read while they were known to be its
    png: bytes = b""


def read_section(folder: Path, name: str) -> tuple[xr.Dataset, bytes]:
    return xr.load_dataset(folder / f"{name}.nc"), (folder / f"{name}.png").read_bytes()


def reuse(out: Path, name: str, key: dict) -> Outcome | None:
    """The section an earlier report made for `key`, or None. Checked and read under the folder's shared lock:
    another command replaces the set only whole, and not meanwhile."""
    with ckpt.folder_lock(out, shared=True):
        if not unchanged(out, name, key):
            return None
        ds, png = read_section(out, name)
    return Outcome("reused", f"reused {out / name}.nc: made at {ds.attrs.get('created', '?')} by the command below, "
                             "on the same checkpoints and data with the same options and software", ds, png)


def make(section: Section, argv: list[str], command: str, key: dict, out: Path) -> Outcome:
    """Run the diagnostic's own command (its printed tables and paths are the page's now) into a private folder,
    record it there, then move the whole set into `out`."""
    started = time.monotonic()
    module = importlib.import_module(f"diagnostics.{section.name}")
    with ckpt.temporary_folder(out / section.name) as private:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module.main([*argv, "--out", str(private)])
        except DiskFull:  # not these inputs' fault, and nothing more can be written: the report stops
            raise
        except BAD_INPUT as exc:
            return Outcome("not made", f"not made: {exc}")
        except SystemExit as exc:  # its parser refused the options this report gave it (the message is above)
            return Outcome("failed", f"failed: {command} exited with code {exc.code}")
        except Exception as exc:  # a bug: keep the other sections, show this one's traceback
            traceback.print_exc()
            return Outcome("failed", f"failed: {type(exc).__name__}: {first_line(exc)} (a bug; its traceback was "
                                     "printed when the report ran)")
        made = sorted(path for path in private.iterdir() if path.is_file())
        with ckpt.atomic_path(record_path(private, section.name)) as temporary:
            temporary.write_text(json.dumps({"command": command, "key": key,
                                             "sha256": {path.name: sha256(path) for path in made}}, indent=1) + "\n")
        ds, png = read_section(private, section.name)
        ckpt.replace_together([(path, out / path.name) for path in [*made, record_path(private, section.name)]], out)
    return Outcome("made", f"made now by the command below in {time.monotonic() - started:.0f} s", ds, png)


# ---------------------------------------------------------------------------------------------------------------
# What the page shows


@dataclass
class SectionView:
    name: str
    title: str
    question: str
    status: str
    note: str
    command: str
    figure: str = ""  # base64 PNG
    width: int = 0
    height: int = 0
    png: bytes = b""
    definition: str = ""
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: list[tuple[str, str]] = field(default_factory=list)


def as_list(value) -> list[str]:
    values = [value] if isinstance(value, str) else list(np.atleast_1d(value))
    return [str(v) for v in values if str(v)]


def listed(inputs: list[str]) -> str:
    """Files grouped by folder (`demo/plain20/epoch_001.pt … epoch_020.pt (20 files)`), then what is not a file
    (`untrained plain20, seed 0`)."""
    folders: dict[str, list[str]] = {}
    for path in filter(lambda text: Path(text).exists(), inputs):
        folders.setdefault(str(Path(path).parent), []).append(Path(path).name)
    files = [str(Path(folder) / names[0]) + ("".join(f", {name}" for name in names[1:]) if len(names) <= 3 else
                                             f" … {names[-1]} ({len(names)} files)")
             for folder, names in folders.items()]
    return "; ".join(files + [text for text in inputs if not Path(text).exists()]) or "none (models built from names)"


def counted(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


@functools.lru_cache(maxsize=None)
def code_commit_of(path: str) -> str:
    """The git commit of the code that trained a checkpoint (a run directory: its last), from its provenance."""
    file = Path(path)
    try:
        if rundir.is_run_dir(file):
            file = rundir.run_checkpoints(file)[-1]
        commit = (ckpt.read(file).get("provenance") or {}).get("git_commit")
    except UserError:
        return f"unknown ({path} is not readable)"
    return commit or "unknown (not trained from a git checkout)"


def provenance(ds: xr.Dataset) -> list[tuple[str, str]]:
    inputs = as_list(ds.attrs.get("checkpoint", []))
    commits = ", ".join(dict.fromkeys(code_commit_of(text) for text in inputs if Path(text).exists())) or "none"
    return [("checkpoints", listed(inputs)), ("trained at git commit", commits),
            ("software", str(ds.attrs.get("software", "?"))), ("created", str(ds.attrs.get("created", "?")))]


def monitor_summary(run: common.Run) -> str:
    """One line on a run's BN monitor (monitor.nc, measured every N training steps)."""
    where = f"{run.label}: BN monitor ({Path(run.text) / 'monitor.nc'})"
    try:
        ds = xr.load_dataset(run.path / "monitor.nc")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        return f"{where}: cannot be read ({first_line(exc)})"
    gap = ds.bn_gap.sel(component="rms").transpose("step", "depth").values
    if not ds.sizes["step"] or not np.isfinite(gap).any():
        return f"{where}: no measurements"
    step, depth = np.unravel_index(np.nanargmax(gap), gap.shape)
    warnings = ds.warning.values.astype(bool)
    first = f", the first at step {int(ds.step.values[warnings.argmax()])}" if warnings.any() else ""
    tensorboard = run.config.get("tensorboard")
    return (f"{where}: {counted(ds.sizes['step'], 'measurement')} every {ds.attrs.get('every', '?')} steps on "
            f"{ds.attrs.get('n_images', '?')} probe images; {counted(int(warnings.sum()), 'early warning')}{first}; "
            f"the largest gap of the running against the batch statistics is {gap[step, depth]:.3g} (normalised "
            f"units) at {ds.layer.values[depth]}, step {int(ds.step.values[step])}"
            + (f"; step by step in TensorBoard: tensorboard --logdir {tensorboard}" if tensorboard else ""))


def findings(runs: list[common.Run]) -> list[tuple[str, list[str]]]:
    """What the report opens with: per run, what its BN statistics cost its validations, where, why and what to
    change (`analyses.monitor.prescription` of its monitor.nc, the lines its trainer printed at the end), and for
    each plain run beside its residual twin the two worst validations side by side."""
    found, worst = [], {}
    for run in runs:
        path = run.path / "monitor.nc"
        if not path.exists():
            found.append((run.label, ["no BN monitor in this run (trained with --monitor-every 0 and "
                                      "--attribution-images 0, or by another trainer)"]))
            continue
        try:
            ds = xr.load_dataset(path)
            result = prescription(ds) if "validation" in ds.dims else None
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            found.append((run.label, [f"{path} cannot be read ({first_line(exc)})"]))
            continue
        if result is None:
            found.append((run.label, [monitor_summary(run).split(": ", 1)[1] + " (a run of version 2: no validation "
                                      "attributed)"]))
            continue
        found.append((run.label, result.lines()))
        if result.worst is not None:
            worst[run.label] = result.worst
    for label, w in worst.items():
        twin = "resnet" + label[len("plain"):] if label.startswith("plain") else None
        if twin in worst:
            r = worst[twin]
            found.append((f"{label} against {twin}", [
                f"without the skip connection the worst validation lost {w['excess']:+.2f} ± {w['se']:.2f} nats to BN "
                f"statistics (epoch {w['epoch']}); with it {r['excess']:+.2f} ± {r['se']:.2f} (epoch {r['epoch']}): "
                "one seed each; python -m diagnostics.trust compares groups of seeds"]))
    return found


def png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])  # the IHDR chunk: width, height


def section_view(section: Section, outcome: Outcome, command: str, runs: list[common.Run]) -> SectionView:
    view = SectionView(section.name, section.title, section.question, outcome.status, outcome.note, command)
    if outcome.ds is not None:
        ds, view.png = outcome.ds, outcome.png
        view.figure = base64.b64encode(view.png).decode("ascii")
        view.width, view.height = png_size(view.png)
        view.definition = str(ds.attrs.get("definition", ""))
        view.tables, view.notes = section.tables(ds), section.notes(ds)
        view.provenance = provenance(ds)
    if section.monitor:
        view.notes += [monitor_summary(run) for run in runs if (run.path / "monitor.nc").is_file()]
    return view


# ---------------------------------------------------------------------------------------------------------------
# The HTML page and the PDF


def render_html(page: dict) -> str:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    template = resources.files("diagnostics").joinpath("report.html").read_text(encoding="utf-8")
    return environment.from_string(template).render(**page)


A4 = (8.27, 11.69)  # inches
MARGIN = 0.6
TEXT_WIDTH = A4[0] - 2 * MARGIN
FIGURE_DPI = 200  # what diagnostics.plotting saves PNGs at: a figure keeps its size in inches
CHARACTER_WIDTH = {"sans-serif": 0.55, "monospace": 0.6}  # in font sizes: DejaVu Sans on average, Sans Mono exactly


class Pages:
    """Text and figures laid out from the top of A4 pages down, a new page where the next item does not fit."""

    def __init__(self, pdf):
        self.pdf, self.figure, self.y = pdf, None, 0.0

    def new_page(self) -> None:
        from matplotlib.figure import Figure
        self.finish()
        self.figure, self.y = Figure(figsize=A4), A4[1] - MARGIN

    def finish(self) -> None:
        if self.figure is not None:
            self.pdf.savefig(self.figure)
            self.figure = None

    def _room(self, height: float) -> None:
        if self.figure is None or self.y - height < MARGIN:
            self.new_page()

    def text(self, text: str, size: float = 8, family: str = "sans-serif", weight: str = "normal",
             colour: str = "black", space_after: float = 0.08) -> None:
        """Prose wrapped at the text width; monospace text keeps its lines and breaks only the longest."""
        characters = max(20, int(TEXT_WIDTH * 72 / (CHARACTER_WIDTH[family] * size)))
        if family == "monospace":
            lines = [line[i:i + characters] for line in text.splitlines() for i in range(0, max(len(line), 1),
                                                                                             characters)]
        else:
            lines = textwrap.wrap(text, characters, break_on_hyphens=False) or [""]
        for line in lines:
            self._room(size * 1.35 / 72)
            self.y -= size * 1.35 / 72
            self.figure.text(MARGIN / A4[0], self.y / A4[1], line, fontsize=size, family=family, weight=weight,
                             color=colour)
        self.y -= space_after

    def table(self, text: str) -> None:
        """Monospace, as small as it takes (down to 5 pt) for the widest line to fit."""
        widest = max((len(line) for line in text.splitlines()), default=1)
        self.text(text, size=max(5.0, min(7.0, TEXT_WIDTH * 72 / (CHARACTER_WIDTH["monospace"] * widest))),
                  family="monospace")

    def image(self, png: bytes) -> None:
        """At the size the figure was drawn for, or smaller where the page is."""
        from matplotlib.image import imread
        pixels = imread(io.BytesIO(png))
        height_px, width_px = pixels.shape[:2]
        scale = min(1.0, TEXT_WIDTH * FIGURE_DPI / width_px, (A4[1] - 2 * MARGIN) * FIGURE_DPI / height_px)
        width, height = scale * width_px / FIGURE_DPI, scale * height_px / FIGURE_DPI
        self._room(height)
        self.y -= height
        axes = self.figure.add_axes(((A4[0] - width) / 2 / A4[0], self.y / A4[1], width / A4[0], height / A4[1]))
        axes.imshow(pixels, interpolation="none")  # the PNG's own pixels, not resampled
        axes.axis("off")
        self.y -= 0.1


def write_pdf(path: Path, page: dict) -> None:
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(path, metadata={"Title": page["title"],
                                                                               "Creator": page["software"]}) as pdf:
        pages = Pages(pdf)
        pages.text(page["title"], size=15, weight="bold", space_after=0.15)
        for line in (f"made {page['created']} by {page['software']}, git commit {page['commit']}",
                     f"command: {page['command']}"):
            pages.text(line, size=8)
        pages.text("Findings: BN statistics at validation", size=11, weight="bold")
        for label, lines in page["findings"]:
            pages.text(label, size=8.5, weight="bold", space_after=0.02)
            for line in lines:
                pages.text(line.strip(), size=7.5, space_after=0.03)
        pages.text("Runs", size=11, weight="bold")
        for run in page["runs"]:
            pages.text(f"{run.label}: {run.text} ({run.dataset}, {run.epochs} epochs, {run.precision})", size=8)
        pages.text("Sections", size=11, weight="bold")
        for view in page["sections"]:
            pages.text(f"{view.title}: {view.status}", size=8)
        for view in page["sections"]:
            pages.new_page()
            pages.text(view.title, size=13, weight="bold")
            pages.text(view.question, size=8.5)
            pages.text(view.note, size=7.5, colour="0.35")
            if view.png:
                pages.image(view.png)
            for heading, blocks, write in (("Definition", [view.definition] if view.definition else [], pages.text),
                                           ("", view.tables, pages.table), ("", view.notes, pages.text),
                                           ("Reproduce", [view.command], pages.table)):
                if blocks and heading:
                    pages.text(heading, size=9, weight="bold")
                for block in blocks:
                    write(block)
            if view.provenance:
                pages.text("Provenance", size=9, weight="bold")
                for name, value in view.provenance:
                    pages.text(f"{name}: {value}", size=7, space_after=0.02)
        pages.finish()


# ---------------------------------------------------------------------------------------------------------------
# The command


def main(argv=None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(given)
    sections = [section for name, section in SECTIONS.items() if name in (args.sections or SECTIONS)]
    common.require_run_dirs(args.runs, "a report reads each run's metrics.csv, config.json and checkpoints")
    first = {}
    for text in args.runs:  # each run once, as it was first named
        first.setdefault(Path(text).resolve(), text)
    runs = [common.read_run(text) for text in first.values()]
    choose_device(args.device)  # --device cuda without a GPU: one line before any work
    out = common.output_dir(args, [common.Source(runs[0].label, run_dir=Path(runs[0].text))])
    check_data(runs, args, sections)
    data = data_identity(runs, args) if any("data_dir" in section.passes for section in sections) else None
    code_commit = ckpt.provenance()["git_commit"]
    out.mkdir(parents=True, exist_ok=True)
    rundir.remove_stale_temporaries(out, [*SECTIONS, "report.pdf", "report.html"])  # what a killed report left
    outcomes, commands = {}, {}
    try:
        with Progress(len(sections), "report", unit="section") as progress:
            for section in sections:
                argv = arguments(section, runs, args)
                commands[section.name] = shlex.join(["python", "-m", f"diagnostics.{section.name}", *argv, "--out",
                                                     str(out)])
                key = cache_key(section, runs, args, code_commit, data)
                outcomes[section.name] = (reuse(out, section.name, key) or
                                          make(section, argv, commands[section.name], key, out))
                progress.write(f"{section.name}: {outcomes[section.name].note}")
                progress.update(1)
    except KeyboardInterrupt as exc:
        print(f"error: interrupted; the sections made so far are kept in {out} and the same command reuses them; "
              "no report was written", file=sys.stderr)
        sys.exit(interrupted_exit_code(exc))
    page = {"title": "Report: " + ", ".join(dict.fromkeys(run.label for run in runs)), "runs": runs,
            "command": f"python -m diagnostics.report {shlex.join(given)}", "software": software(),
            "commit": code_commit or "unknown (not a git checkout)",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sections": [section_view(section, outcomes[section.name], commands[section.name], runs)
                         for section in sections], "findings": findings(runs),
            "spikes": "spikes" in outcomes}
    with ckpt.atomic_paths([out / "report.pdf", out / "report.html"]) as (pdf, html):  # both or neither
        write_pdf(pdf, page)
        html.write_text(render_html(page), encoding="utf-8")
    for label, lines in page["findings"]:  # the page's first lines, where the user is looking now
        print(f"{label}: {lines[0].strip()}")
        for line in lines[1:]:
            print(f"  {line.strip()}")
    print(out / "report.pdf")
    print(out / "report.html")
    failed = [name for name, outcome in outcomes.items() if outcome.status == "failed"]
    if failed:
        print(f"error: {', '.join(failed)} failed (see above); the report shows the other sections", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
