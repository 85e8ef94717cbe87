"""`python -m diagnostics.report`: one self-contained page (and PDF) for a set of runs, sections reused when made
for the same checkpoints and options, bad input as everywhere; the page rendered in headless Chromium."""
import base64
import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import xarray as xr
from markupsafe import escape

import diagnostics.curves
import diagnostics.flops
from conftest import run_command, tiny_images, write_cifar_batch, write_image_folder
from diagnostics import common, report
from train.__main__ import main as train_main
from train.errors import UserError

SECTIONS = ["curves", "evaluate", "flops", "attributions"]  # the quick ones, the full-width figure among them
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def run_report(*argv) -> SimpleNamespace:
    """The command in this process: exit code, stdout and stderr lines."""
    code, out, err = run_command(report, argv)
    return SimpleNamespace(code=code, stdout=out.splitlines(), stderr=err.splitlines())


def printed(main, argv) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(arg) for arg in argv])
    return out.getvalue().splitlines()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_runs) -> list[Path]:
    """Copies of the tiny runs, so that a test may touch their files."""
    root = tmp_path_factory.mktemp("report-runs")
    return [Path(shutil.copytree(tiny_runs[name], root / name)) for name in ("plain20", "resnet20")]


@pytest.fixture(scope="module")
def made(runs, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("report") / "out"
    result = run_report(*runs, "--sections", *SECTIONS, "--out", out)
    assert result.code == 0, result.stderr
    return SimpleNamespace(**vars(result), out=out, html=(out / "report.html").read_text(encoding="utf-8"))


class Elements(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


# ---------------------------------------------------------------------------------------------------------------
# The page


def test_the_page_holds_every_sections_figure_definition_table_command_and_provenance(made, runs):
    assert made.stdout[-2:] == [str(made.out / "report.pdf"), str(made.out / "report.html")]
    assert [line.split(":")[0] for line in made.stdout[:len(SECTIONS)]] == SECTIONS
    findings = report.findings([common.read_run(str(run)) for run in runs])  # printed before the paths
    printed = [[f"{label}: {lines[0]}", *(f"  {line.strip()}" for line in lines[1:])] for label, lines in findings]
    assert made.stdout[len(SECTIONS):-2] == [line for lines in printed for line in lines]
    elements = Elements(made.html).elements
    assert not [tag for tag, _ in elements if tag in ("script", "link", "iframe", "object", "embed")]
    references = [value for _, attrs in elements for name, value in attrs.items() if name in ("src", "href")]
    assert all(value.startswith(("data:image/png;base64,", "#")) for value in references)  # nothing to fetch
    figures = [attrs["src"].split(",", 1)[1] for tag, attrs in elements if tag == "img"]
    assert [base64.b64decode(figure) for figure in figures] == [(made.out / f"{name}.png").read_bytes()
                                                                for name in SECTIONS]
    inputs = " ".join(map(str, runs))
    for name in SECTIONS:
        ds = xr.load_dataset(made.out / f"{name}.nc")
        assert str(escape(ds.attrs["definition"])) in made.html
        epochs = " --epochs last" if name == "evaluate" else ""
        assert str(escape(f"python -m diagnostics.{name} {inputs}{epochs} --out {made.out}")) in made.html
        assert str(escape(ds.attrs["created"])) in made.html
    for run in runs:  # what each run trained in, as its config.json says: a spike's size depends on it
        config = json.loads((run / "config.json").read_text())
        assert f"<td>{config['epochs']}</td><td>{config['precision_used']} on {config['device_used']}</td>" in made.html
    commit = torch.load(runs[0] / "epoch_002.pt", weights_only=True)["provenance"]["git_commit"]
    assert (commit or "not trained from a git checkout") in made.html
    pdf = (made.out / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf)) >= 1 + len(SECTIONS)


def test_the_tables_are_the_ones_the_commands_print(made, runs):
    """The report prints each table from its dataset with the command's own function; the headers of curves and
    evaluate, which their commands write inline, must stay the same as theirs."""
    curves_lines = printed(diagnostics.curves.main, [*runs, "--out", made.out / "again"])
    evaluate_lines = printed(diagnostics.evaluate.main, [*runs, "--epochs", "last", "--out", made.out / "again"])
    for lines, header in ((curves_lines, diagnostics.curves.SUMMARY_HEADER), (evaluate_lines, diagnostics.evaluate.TABLE_HEADER)):
        start = next(i for i, line in enumerate(lines) if line.split() == " ".join(header).split())
        table = "\n".join(lines[start:start + 1 + len(runs)])
        assert str(escape(table)) in made.html


def test_gradients_compare_with_each_runs_model_untrained_and_the_monitor_is_summarised(runs):
    checked = [common.read_run(str(run)) for run in runs]
    assert [report.initial_model(run) for run in checked] == ["plain20", "resnet20"]
    args = report.parser().parse_args([*map(str, runs), "--split", "test", "--n-images", "64"])
    assert report.arguments(report.SECTIONS["gradients"], checked, args) == [
        *map(str, runs), "--epochs", "last", "--init", "plain20", "--init", "resnet20", "--split", "test",
        "--n-images", "64"]
    assert report.arguments(report.SECTIONS["flops"], checked, args) == list(map(str, runs))
    monitor = xr.load_dataset(runs[0] / "monitor.nc")
    gap = monitor.bn_gap.sel(component="rms")
    worst = gap.where(gap == gap.max(), drop=True)
    line = report.monitor_summary(checked[0])
    assert f"{monitor.sizes['step']} measurements every 2 steps on 64 probe images" in line
    warnings = int(monitor.warning.sum())
    assert f"{warnings} early warning{'' if warnings == 1 else 's'}" in line
    assert f"{gap.max().item():.3g} (normalised units) at {worst.layer.item()}, step {worst.step.item()}" in line


def test_a_second_report_reuses_what_was_made_for_the_same_inputs_and_options(made, runs):
    before = {name: (made.out / f"{name}.nc").stat().st_mtime_ns for name in SECTIONS}
    again = run_report(*runs, "--sections", *SECTIONS, "--out", made.out)
    assert again.code == 0
    assert [line.split(": ")[:2] for line in again.stdout[:len(SECTIONS)]] == [[name, f"reused {made.out / name}.nc"]
                                                                                 for name in SECTIONS]
    assert {name: (made.out / f"{name}.nc").stat().st_mtime_ns for name in SECTIONS} == before
    assert "reused" in (made.out / "report.html").read_text()
    # Another option, a checkpoint written again, a .nc written by hand: made again.
    assert run_report(*runs, "--sections", "flops", "--device", "cpu", "--out", made.out).stdout[0].startswith(
        "flops: made now")
    os.utime(runs[1] / "epoch_002.pt")
    assert run_report(*runs, "--sections", "curves", "--out", made.out).stdout[0].startswith("curves: made now")
    printed(diagnostics.curves.main, [*runs, "--early", "1", "--out", made.out])
    assert run_report(*runs, "--sections", "curves", "--out", made.out).stdout[0].startswith("curves: made now")
    assert json.loads((made.out / "curves.command.json").read_text())["command"] == (
        f"python -m diagnostics.curves {' '.join(map(str, runs))} --out {made.out}")


def test_a_section_is_made_again_when_the_images_it_read_or_its_own_files_changed(cifar10_dir, tmp_path,
                                                                                   monkeypatch):
    """Issue 27: the key holds the resolved data directory and the files of the dataset's folder, the record the
    hash of every file made (.png and .pdf as well as .nc)."""
    run = tmp_path / "run"
    assert train_main(["--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(cifar10_dir), "--train-images",
                       "20", "--batch-size", "10", "--epochs", "1", "--precision", "fp32", "--monitor-every", "0",
                       "--attribution-images", "0", "--out", str(run)]) == 0
    other = Path(shutil.copytree(cifar10_dir / "cifar-10-batches-py", tmp_path / "other" / "cifar-10-batches-py"))
    out = tmp_path / "out"

    def first_line() -> str:
        result = run_report(run, "--sections", "evaluate", "--out", out)
        assert result.code == 0, result.stderr
        return result.stdout[0]

    monkeypatch.setenv("RESNET_DIAG_DATA", str(cifar10_dir))
    assert first_line().startswith("evaluate: made now") and first_line().startswith("evaluate: reused")
    monkeypatch.setenv("RESNET_DIAG_DATA", str(other.parent))  # another data directory, the same command line
    assert first_line().startswith("evaluate: made now") and first_line().startswith("evaluate: reused")
    write_cifar_batch(other / "test_batch", tiny_images(30, 7), [j % 10 for j in range(30)])  # other images
    assert first_line().startswith("evaluate: made now") and first_line().startswith("evaluate: reused")
    for suffix in ("png", "pdf"):  # an output edited by hand
        with open(out / f"evaluate.{suffix}", "ab") as file:
            file.write(b"edited")
        assert first_line().startswith("evaluate: made now")
    assert set(json.loads((out / "evaluate.command.json").read_text())["sha256"]) == {
        "evaluate.nc", "evaluate.png", "evaluate.pdf"}


@pytest.mark.parametrize("where", ["section", "page"])
def test_a_full_disk_during_the_report_is_one_line_and_no_page(where, runs, tmp_path, monkeypatch):
    """ENOSPC, simulated where a diagnostic writes its dataset, or where the page's HTML is written after its PDF:
    one line, exit 2, neither report.html nor report.pdf, no temporary left."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "section":
        monkeypatch.setattr(xr.Dataset, "to_netcdf", full)
    else:
        monkeypatch.setattr(report, "render_html", full)
    out = tmp_path / "out"
    result = run_report(*runs, "--sections", "curves", "--out", out)
    assert result.code == 2 and len(result.stderr) == 1, result.stderr
    assert result.stderr[0].startswith("error: no space left on the disk while writing")
    assert not (out / "report.html").exists() and not (out / "report.pdf").exists()
    assert not [path for path in out.iterdir() if path.name.startswith(".")]


def test_a_refused_section_is_noted_and_a_failing_one_fails_alone(runs, tmp_path, monkeypatch):
    def refuses(argv):
        raise UserError("these runs do not suit curves")

    def breaks(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(diagnostics.curves, "main", refuses)
    monkeypatch.setattr(diagnostics.flops, "main", breaks)
    result = run_report(*runs, "--sections", "curves", "flops", "--out", tmp_path / "out")
    assert result.code == 1
    assert "RuntimeError: boom" in result.stderr and result.stderr[-1].startswith("error: flops failed")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "not made: these runs do not suit curves" in page and "failed: RuntimeError: boom" in page
    assert "<img" not in page and not list((tmp_path / "out").glob("*.command.json"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("argv, phrase", [
    (["{tmp}/nowhere"], "does not exist"),
    (["{run}/epoch_001.pt"], "is a checkpoint file"),
    (["{empty_run}"], "holds no checkpoints"),
    (["{run}", "--sections", "fig7"], "invalid choice: 'fig7'"),
    (["{run}", "--n-images", "0"], "must be a positive integer"),
    (["{run}", "--split", "holdout"], "invalid choice: 'holdout'"),
    (["{run}", "--out", "{run}/config.json/report"], "is a file, not a folder"),
], ids=["missing", "checkpoint file", "no checkpoints", "unknown section", "zero images", "unknown split",
        "out under a file"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(argv, phrase, runs, tmp_path):
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    for name in ("config.json", "metrics.csv"):
        shutil.copy(runs[0] / name, empty_run / name)
    before = sorted(path for run in runs for path in run.rglob("*"))
    values = {"tmp": tmp_path, "run": runs[0], "empty_run": empty_run}
    argv = [part.format(**values) for part in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    result = run_report(*argv, *out)
    assert result.code == 2 and len(result.stderr) == 1, result.stderr
    assert result.stderr[0].startswith("error: ") and phrase in result.stderr[0]
    assert not (tmp_path / "out").exists() and sorted(path for run in runs for path in run.rglob("*")) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_a_missing_gpu_is_bad_input(runs, tmp_path):
    result = run_report(runs[0], "--device", "cuda", "--out", tmp_path / "out")
    assert result.code == 2 and "no GPU is visible" in result.stderr[0] and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# In a real browser

LAYOUT_CHECK = """<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const outside = element => {
    const box = element.getBoundingClientRect();
    return box.right > width + 0.5 || box.left < -0.5;
  };
  const result = {
    width, scrollWidth: document.documentElement.scrollWidth,
    images: [...document.images].map(image => image.complete && image.naturalWidth > 0),
    overflowing: [...document.querySelectorAll("body *")].filter(e => !e.closest("pre") || e.tagName === "PRE")
                   .filter(outside).map(e => e.tagName + " " + e.textContent.slice(0, 60)),
    scrolling: [...document.querySelectorAll("pre")].filter(e => e.scrollWidth > e.clientWidth)
                 .map(e => e.textContent.slice(0, 60)),
  };
  const out = document.createElement("pre");
  out.id = "layout-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def chromium(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no browser: neither chromium, chromium-browser nor google-chrome is installed (make test "
                    "installs Debian's chromium when run as root; or apt-get install chromium)")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", *options], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("width", [1280, 420], ids=["desktop", "phone"])
def test_in_headless_chromium_every_figure_loads_and_nothing_overflows(made, tmp_path, width):
    page = tmp_path / "checked.html"  # the report with a script that measures the layout once it has loaded
    page.write_text(made.html.replace("</body>", LAYOUT_CHECK + "\n</body>"), encoding="utf-8")
    dom = chromium(tmp_path, f"--window-size={width},900", "--dump-dom", page.as_uri()).stdout
    found = re.search(r'<pre id="layout-check">(.*?)</pre>', dom, re.S)
    assert found, "the page did not finish loading in Chromium"
    layout = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">"))
    assert layout["images"] == [True] * len(SECTIONS)
    assert layout["overflowing"] == [] and layout["scrollWidth"] <= layout["width"]
    if width >= 1000:
        assert layout["scrolling"] == []  # on a desktop every table is seen whole
    screenshot = tmp_path / "report.png"
    chromium(tmp_path, f"--window-size={width},2400", f"--screenshot={screenshot}", (made.out / "report.html").as_uri())
    assert screenshot.read_bytes().startswith(b"\x89PNG") and report.png_size(screenshot.read_bytes()) == (width, 2400)


def test_provenance_lists_checkpoints_by_folder(tmp_path):
    files = [tmp_path / "plain20" / f"epoch_{epoch:03d}.pt" for epoch in range(1, 6)] + [tmp_path / "r20" / "a.pt"]
    for path in files:
        path.parent.mkdir(exist_ok=True)
        path.touch()
    assert report.listed([str(path) for path in files[:2]] + ["untrained plain20, seed 0"]) == (
        f"{files[0]}, epoch_002.pt; untrained plain20, seed 0")
    assert report.listed([str(path) for path in files]) == f"{files[0]} … epoch_005.pt (5 files); {files[5]}"
    assert report.listed([]) == "none (models built from names)"


def test_the_report_opens_with_each_runs_findings(tiny_runs, tmp_path):
    """The first lines of the page: per run the prescription its trainer printed at the end (worst validation,
    where, why, what), then plain against residual; a run without a monitor says so."""
    from analyses.monitor import prescription
    runs = [common.read_run(str(tiny_runs[name])) for name in ("plain20", "resnet20")]
    found = dict(report.findings(runs))
    for name in ("plain20", "resnet20"):
        assert found[name] == prescription(xr.load_dataset(tiny_runs[name] / "monitor.nc")).lines()
        assert found[name][0].startswith("BN statistics: the worst validation, epoch")
    (contrast,) = found["plain20 against resnet20"]
    assert contrast.startswith("without the skip connection the worst validation lost")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_runs["plain20"], bare, ignore=shutil.ignore_patterns("diagnostics", "monitor.nc"))
    assert "no BN monitor in this run" in dict(report.findings([common.read_run(str(bare))]))["plain20"][0]


def test_no_figure_of_the_report_has_an_empty_panel(runs, tmp_path, monkeypatch):
    """Every section's figures, drawn from the tiny runs: each axes draws data, or says in words why it has none
    (a colour bar is neither)."""
    drawn = {}
    write = common.write_outputs

    def keep(out, name, dataset, figure=None):
        figures = figure if isinstance(figure, dict) else {"": figure}
        drawn.update({f"{name}{'_' + suffix if suffix else ''}": fig for suffix, fig in figures.items()
                      if fig is not None})
        return write(out, name, dataset, figure)

    monkeypatch.setattr(common, "write_outputs", keep)
    result = run_report(*runs, "--n-images", "64", "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert set(report.SECTIONS) <= set(drawn), sorted(drawn)
    empty = [f"{name}: {axis.get_title(loc='left') or axis.get_title() or axis.get_ylabel()!r}"
             for name, fig in drawn.items() for axis in fig.axes
             if axis.get_label() != "<colorbar>" and axis.get_visible() and not axis.has_data()
             and not any(text.get_text().strip() for text in axis.texts)]
    assert not empty, empty


def test_a_folder_run_trained_with_image_size_on_images_of_mixed_sizes_is_reported(tmp_path):
    """The report loads each run's splits as its diagnostics do, with the run's --image-size (issue 29: it stopped
    with "give --image-size N", an option the report does not have)."""
    pictures = write_image_folder(tmp_path / "pictures", {"train": 4, "val": 2})
    larger = write_image_folder(tmp_path / "larger", {"train": 1, "val": 1}, size=20, seed=1)
    for image in larger.rglob("*.png"):
        shutil.move(image, pictures / image.relative_to(larger).parent / f"larger_{image.name}")
    run = tmp_path / "run"
    assert train_main(["--model", "resnet20", "--dataset", f"folder:{pictures}", "--image-size", "16", "--batch-size",
                       "5", "--epochs", "1", "--precision", "fp32", "--monitor-every", "0", "--attribution-images",
                       "0", "--out", str(run)]) == 0
    result = run_report(run, "--sections", "evaluate", "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert result.stdout[0].startswith("evaluate: made now")
