"""Paper-style figures: sized for a 3.3-inch column (readable scaled to full width), plain dashed, residual solid."""
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMN_WIDTH, FULL_WIDTH = 3.3, 6.9  # inches, a two-column paper
STYLE = {
    "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6, "xtick.labelsize": 6,
    "ytick.labelsize": 6, "lines.linewidth": 1.0, "axes.linewidth": 0.6, "grid.linewidth": 0.4,
    "grid.alpha": 0.4, "legend.frameon": False, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,
}
plt.rcParams.update(STYLE)


def figure(rows: int = 1, cols: int = 1, width: float = COLUMN_WIDTH, height: float | None = None, **kwargs):
    height = height if height is not None else 2.0 * rows
    return plt.subplots(rows, cols, figsize=(width, height), squeeze=False, **kwargs)


def model_style(label: str, index: int = 0, plain: bool | None = None) -> dict:
    """The paper's convention: plain nets dashed, residual solid; one colour per depth, shared by the twins."""
    plain = label.startswith("plain") if plain is None else plain
    depth = re.search(r"(\d+)", label)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette = {20: 0, 32: 1, 44: 2, 56: 3, 110: 4, 1202: 5, 18: 6, 34: 7, 50: 8, 101: 9}
    slot = palette.get(int(depth.group(1)), index) if depth else index
    return {"color": colours[slot % len(colours)], "linestyle": "--" if plain else "-", "label": label}
