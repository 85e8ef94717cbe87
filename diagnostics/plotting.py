"""Paper-style figures: sized for a 3.3-inch column (readable scaled to full width), plain dashed, residual solid.

Importing this changes nothing of matplotlib's: the style applies inside each figure function (`@styled`) and
when the figure is saved, so a notebook keeps its own backend and rcParams. The command lines choose the
file-only backend for themselves (`use_file_backend`).
"""
import functools
import re

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import LogFormatter

COLUMN_WIDTH, FULL_WIDTH = 3.3, 6.9  # inches, a two-column paper
STYLE = {
    "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6, "xtick.labelsize": 6,
    "ytick.labelsize": 6, "lines.linewidth": 1.0, "axes.linewidth": 0.6, "grid.linewidth": 0.4,
    "grid.alpha": 0.4, "legend.frameon": False, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,
}


def styled(function):
    """Run a figure function with this module's style (matplotlib's rc_context: restored after)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return function(*args, **kwargs)
    return wrapper


def save(fig, path, format: str) -> None:
    with plt.rc_context(STYLE):  # savefig reads bbox, padding and font embedding from rcParams
        fig.savefig(path, format=format, dpi=200)


def use_file_backend() -> None:
    """Agg: figures go to files only (no display needed); for the command lines, not for a notebook."""
    matplotlib.use("Agg")


def figure(rows: int = 1, cols: int = 1, width: float = COLUMN_WIDTH, height: float | None = None, **kwargs):
    height = height if height is not None else 2.0 * rows
    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False, **kwargs)


def model_style(label: str, index: int = 0, plain: bool | None = None) -> dict:
    """The paper's convention: plain nets dashed, residual solid; one colour per depth, shared by the twins
    (CIFAR and ImageNet-style ResNets in tab20's dark shades, VGGs in its light ones)."""
    plain = label.startswith("plain") if plain is None else plain
    depth = re.search(r"(\d+)", label)
    slots = {20: 0, 32: 2, 44: 4, 56: 6, 110: 8, 1202: 10, 18: 12, 34: 14, 50: 16, 101: 18}
    if label.startswith("vgg"):
        slots = {11: 1, 13: 3, 16: 5, 19: 7}
    slot = slots.get(int(depth.group(1)), 2 * index) if depth else 2 * index
    return {"color": plt.get_cmap("tab20")(slot % 20), "linestyle": "--" if plain else "-", "label": label}


def line_styles(labels: list[str], plain: dict[str, bool]) -> list[dict]:
    """`model_style` for each label, or one colour per line where two lines would look the same (two runs of
    one model, a run and the same model at initialisation)."""
    styles = [model_style(label, index, plain.get(label)) for index, label in enumerate(labels)]
    looks = [(style["color"], style["linestyle"]) for style in styles]
    if len(set(looks)) < len(looks):
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        styles = [{**style, "color": colours[index % len(colours)]} for index, style in enumerate(styles)]
    return styles


class PlainLogFormatter(LogFormatter):
    """The log-axis ticks matplotlib chooses to label, written 0.2 or 5 rather than 2x10^-1."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def plain_log_labels(axis) -> None:
    axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
