"""Image folders (`--dataset folder:PATH`, ImageFolder's layout): read with known pixels, sizes, channels and
statistics; every defect of a file one line naming it; and end to end: our trainer on a folder, then the
diagnostics on its run and on a bare torchvision state_dict with the folder."""
import shutil

import numpy as np
import pytest
import torch
import torchvision
import xarray as xr
from PIL import Image

import models
from conftest import FOLDER_CLASSES, run_command, write_image_folder
from diagnostics import attributions, evaluate, gradients, responses, spikes
from train import checkpoint as ckpt
from train import datasets
from train.__main__ import main as train_main
from train.batches import augment
from train.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def folder(path) -> str:
    return datasets.dataset_name(f"folder:{path}")


def read(path, split="train", **options) -> datasets.Images:
    return datasets.load_split(folder(path), split, **options)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def test_classes_labels_and_pixels_as_imagefolder_reads_them(image_folder):
    ours = read(image_folder)
    theirs = torchvision.datasets.ImageFolder(image_folder / "train")
    assert datasets.folder_classes(folder(image_folder)) == tuple(theirs.classes) == FOLDER_CLASSES
    assert ours.images.shape == (36, 3, 16, 16) and ours.images.dtype == torch.uint8
    expected = {(tuple(np.asarray(image).transpose(2, 0, 1).ravel()), label) for image, label in theirs}
    assert {(tuple(image.ravel().tolist()), int(label)) for image, label in zip(ours.images, ours.labels)} == expected
    assert ours.labels[:6].tolist() == ours.labels[-6:].tolist() == [0, 1, 2, 0, 1, 2]  # classes spread evenly
    assert torch.equal(ours.images, read(image_folder).images)  # ... always the same way
    assert len(read(image_folder, "val")) == 12 and len(read(image_folder, "test")) == 12  # val/ stands in for test/


def test_statistics_are_measured_over_the_training_images(image_folder):
    train = read(image_folder)
    spec = datasets.folder_spec(folder(image_folder), train)
    pixels = train.images.double() / 255
    assert spec.mean == pytest.approx(pixels.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert spec.std == pytest.approx(pixels.std((0, 2, 3), correction=0).tolist(), abs=1e-12)
    assert (spec.num_classes, spec.in_channels, spec.image_size, spec.classes) == (3, 3, 16, FOLDER_CLASSES)
    assert datasets.folder_spec(spec.name, train, mean=[0.5] * 3, std=[0.25] * 3).std == (0.25,) * 3


def test_one_split_with_held_out_images(tmp_path):
    root = write_image_folder(tmp_path / "flat", {"train": 5})
    for name in FOLDER_CLASSES:  # PATH/CLASS/*.png: the training images alone
        shutil.move(root / "train" / name, root / name)
    (root / "train").rmdir()
    assert len(read(root, val_split=6)) == 9 and len(read(root, "val", val_split=6)) == 6
    with pytest.raises(UserError, match="no val/ or test/ folder.*--val-split"):
        read(root, "val")


def test_greyscale_folders_are_one_channel_and_mixed_ones_rgb(tmp_path):
    grey = write_image_folder(tmp_path / "grey", {"train": 2}, mode="L")
    assert read(grey).images.shape == (6, 1, 16, 16)
    Image.new("RGB", (16, 16), (10, 20, 30)).save(grey / "train" / "cat" / "colour.png")
    mixed = read(grey).images
    assert mixed.shape == (7, 3, 16, 16)
    grey_pixels = np.asarray(Image.open(grey / "train" / "dog" / "000.png"))
    assert any(torch.equal(image, torch.from_numpy(np.stack([grey_pixels] * 3))) for image in mixed)


def test_image_size_resizes_the_shorter_side_and_keeps_the_centre(tmp_path):
    root = tmp_path / "sizes"
    write_image_folder(root, {"train": 1})
    wide = np.zeros((8, 24, 3), dtype=np.uint8)  # 24 wide, 8 high: the centre 8x8 is white
    wide[:, 8:16] = 255
    Image.fromarray(wide).save(root / "train" / "cat" / "wide.png")
    with pytest.raises(UserError, match=r"wide.png is 24x8 but .*000.png is 16x16; give --image-size"):
        read(root)
    images = read(root, image_size=8)
    assert images.images.shape == (4, 3, 8, 8)
    assert any(bool((image == 255).all()) for image in images.images)  # wide.png: shorter side 8 already, centre kept
    Image.fromarray(wide).save(root / "train" / "cat" / "000.png")  # now the first image is not square
    with pytest.raises(UserError, match="000.png is 24x8, not square"):
        read(root)


@pytest.mark.parametrize("defect, write, phrase", [
    ("empty", lambda path: path.write_bytes(b""), "is empty, not an image"),
    ("garbage", lambda path: path.write_bytes(b"not a png at all" * 10), "is not a readable image"),
    ("truncated", lambda path: path.write_bytes(path.read_bytes()[:60]), "is not a readable image"),
    ("16-bit", lambda path: Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(path),
     "16- or 32-bit pixels"),
])
def test_a_defective_image_is_one_line_naming_it(tmp_path, defect, write, phrase):
    root = write_image_folder(tmp_path / defect, {"train": 2})
    bad = root / "train" / "dog" / "001.png"
    write(bad)
    with pytest.raises(UserError) as error:
        read(root)
    assert str(error.value).startswith(str(bad)) and phrase in str(error.value) and "\n" not in str(error.value)


def test_folder_layout_errors_name_the_folder(tmp_path):
    root = write_image_folder(tmp_path / "layout", {"train": 1, "val": 1})
    (root / "val" / "wolf").mkdir()
    with pytest.raises(UserError, match="val/wolf is a class the training images"):
        read(root, "val")
    (root / "train" / "eel").mkdir()
    with pytest.raises(UserError, match="train/eel holds no images"):
        read(root)
    with pytest.raises(UserError, match="is not a folder"):
        read(tmp_path / "nowhere")


def test_crop_padding_scales_with_the_image_side():
    images = torch.randint(1, 256, (32, 3, 16, 16), dtype=torch.uint8)
    spec = datasets.DatasetSpec("folder:/x", 3, 3, 16, (0.0,) * 3, (1 / 255,) * 3, FOLDER_CLASSES)  # x = pixel value
    out = augment(images, spec, "crop-flip", torch.Generator().manual_seed(0)).round().to(torch.uint8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))  # 16 / 8 = 2 pixels, as 4 at CIFAR's 32
    for i in range(len(images)):
        candidates = [padded[i, :, dy:dy + 16, dx:dx + 16] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in candidates)
    assert any((out[i] == 0).any() and not torch.equal(out[i], images[i]) for i in range(len(images)))


# ---------------------------------------------------------------------------------------------------------------
# Training on a folder, and the diagnostics


def test_a_run_on_a_folder_stores_what_rebuilds_and_normalises_it(folder_run, image_folder):
    state = torch.load(folder_run / "epoch_002.pt", weights_only=True)
    assert state["model"] == {"name": "torchvision:resnet18", "kwargs": {"num_classes": 3, "in_channels": 3}}
    spec = datasets.folder_spec(folder(image_folder), read(image_folder))
    assert state["dataset"] == spec.to_dict() and state["dataset"]["name"] == f"folder:{image_folder.absolute()}"
    model = models.build(state["model"]["name"], **state["model"]["kwargs"])
    model.load_state_dict(state["state_dict"])  # their module names: layer1.0.bn1, fc
    assert ckpt.load(folder_run / "epoch_002.pt").label == "torchvision:resnet18"


@pytest.mark.parametrize("argv, phrase", [
    (["--model", "torchvision:resnet18", "--dataset", "folder:{grey}"], "built for 3-channel (RGB) images, not 1"),
    (["--model", "resnet20", "--dataset", "synthetic", "--image-size", "16"], "drop --image-size"),
    (["--model", "resnet20", "--dataset", "folder:{grey}", "--mean", "0.5"], "--mean and --std go together"),
    (["--model", "torchvision:resnet18", "--no-skip", "--dataset", "folder:{grey}"], "does not take skip"),
])
def test_trainer_refusals_are_one_line(tmp_path, capsys, argv, phrase):
    grey = write_image_folder(tmp_path / "grey", {"train": 2, "val": 1}, mode="L")
    out = tmp_path / "run"
    assert train_main([a.format(grey=grey) for a in argv] + ["--out", str(out), "--epochs", "1", "--batch-size", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0] and not out.exists()


def test_a_torchvision_state_dict_and_a_folder_through_the_diagnostics(tmp_path, image_folder):
    torch.manual_seed(0)
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    common_argv = [str(path), "--model", "torchvision:resnet18", "--dataset", f"folder:{image_folder}",
                   "--batch-size", "6"]
    for command, extra in ((responses, []), (gradients, ["--batches", "2"]), (evaluate, []),
                           (attributions, ["--n-images", "3", "--steps", "2"])):
        name = command.__name__.rsplit(".", 1)[1]
        out = tmp_path / name
        code, stdout, stderr = run_command(command, common_argv + extra + ["--out", str(out)])
        assert code == 0, stderr
        assert stdout.splitlines()[-3:] == [str(out / f"{name}.{ext}") for ext in ("nc", "png", "pdf")]
        ds = xr.open_dataset(out / f"{name}.nc")
        assert ds.attrs["dataset"] == f"folder:{image_folder}" and ds.model.values.tolist() == ["torchvision:resnet18"]
    assert xr.open_dataset(tmp_path / "responses" / "responses.nc").layer.values[0, 0] == "layer1.0.bn1"
    scores = xr.open_dataset(tmp_path / "evaluate" / "evaluate.nc")
    assert scores.class_name.values.tolist() == list(FOLDER_CLASSES) and int(scores.class_count.sum()) == 12
    # without --model the file does not say what it is: refused in one line
    code, _, stderr = run_command(responses, [str(path), "--out", str(tmp_path / "x")])
    assert code == 2 and "--model NAME" in stderr


def test_responses_refuse_a_model_without_bn_and_take_layers_instead(tmp_path, image_folder):
    path = tmp_path / "squeezenet.pt"
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), path)
    argv = [str(path), "--model", "torchvision:squeezenet1_1", "--dataset", f"folder:{image_folder}",
            "--image-size", "32", "--out", str(tmp_path / "out")]
    code, _, stderr = run_command(responses, argv)
    assert code == 2 and "no 3x3 convolution followed directly by BatchNorm" in stderr and "--layers" in stderr
    code, _, stderr = run_command(responses, argv + ["--layers", "features.*.expand3x3"])
    assert code == 0, stderr
    ds = xr.open_dataset(tmp_path / "out" / "responses.nc")
    assert ds.layer.values[0].tolist()[:2] == ["features.3.expand3x3", "features.4.expand3x3"]
    assert "matches features.*.expand3x3" in ds.attrs["definition"]


def test_layers_that_run_twice_or_match_nothing_are_refused(folder_run, tmp_path):
    argv = [str(folder_run), "--epochs", "last", "--out", str(tmp_path / "out")]
    code, _, stderr = run_command(responses, argv + ["--layers", "layer1.0.relu"])
    assert code == 2 and "layer1.0.relu of torchvision:resnet18 runs 2 times" in stderr  # shared by bn1 and the sum
    code, _, stderr = run_command(responses, argv + ["--layers", "stage*"])
    assert code == 2 and "no module of torchvision:resnet18 matches --layers stage*" in stderr


def test_a_run_on_a_moved_folder_is_found_with_dataset(folder_run, image_folder, tmp_path):
    moved = shutil.copytree(image_folder, tmp_path / "moved")
    argv = [str(folder_run), "--epochs", "last", "--n-images", "4", "--out", str(tmp_path / "out")]
    code, _, stderr = run_command(responses, argv + ["--dataset", f"folder:{moved}"])
    assert code == 0, stderr
    assert xr.open_dataset(tmp_path / "out" / "responses.nc").attrs["dataset"] == f"folder:{moved}"
    (moved / "train" / "dog").rename(moved / "train" / "wolf")
    code, _, stderr = run_command(responses, argv + ["--dataset", f"folder:{moved}"])
    assert code == 2 and "not the cat, dog, fox" in stderr


def test_spikes_on_a_run_trained_on_a_folder(folder_run, tmp_path):
    code, stdout, stderr = run_command(spikes, [str(folder_run), "--recal-images", "24", "--out",
                                                str(tmp_path / "out")])
    assert code == 0, stderr
    ds = xr.open_dataset(tmp_path / "out" / "spikes.nc")
    assert ds.model.values.tolist() == ["torchvision:resnet18"] and ds.epoch.values.tolist() == [1, 2]
    assert ds.layer.values[0, 0] == "bn1" and "torchvision:resnet18" in stdout


def test_image_bombs_are_refused_by_their_declared_size_before_decoding(tmp_path, recwarn):
    """A 1-bit PNG of 20000x20000 is 48 KB on disk and 400M pixels decoded (Pillow refuses it at open, with a
    warning first for smaller ones); one of 5000x5000 is below Pillow's limits and was decoded whole (+75 MB)."""
    for name, size, mode, phrase in (("huge", (20000, 20000), "1", "declares more than the 16,777,216 pixels"),
                                     ("large", (5000, 5000), "RGB", "is 5000x5000 pixels, more than")):
        root = write_image_folder(tmp_path / name, {"train": 1})
        bomb = root / "train" / "dog" / "bomb.png"
        Image.new(mode, size).save(bomb)
        for image_size in (None, 8):
            with pytest.raises(UserError, match=phrase) as error:
                read(root, image_size=image_size)
            assert str(error.value).startswith(str(bomb))
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_large_jpeg_is_decoded_reduced_to_the_size_asked(tmp_path):
    root = write_image_folder(tmp_path / "photo", {"train": 1})
    Image.new("RGB", (6000, 5000), (200, 10, 10)).save(root / "train" / "dog" / "photo.jpg")  # 30M pixels
    images = read(root, image_size=16)
    assert images.images.shape[1:] == (3, 16, 16)
    assert any(abs(int(image[0, 8, 8]) - 200) <= 3 for image in images.images)


def test_a_split_that_would_not_fit_in_memory_is_refused_naming_its_size(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "many", {"train": 2})
    monkeypatch.setattr(datasets, "available_memory", lambda: 2 * 6 * 3 * 1000 * 1000 - 2)  # 6 images at 1000 px
    with pytest.raises(UserError, match=r"would need 17 MiB as 6 images of 3x1000x1000, more than half"):
        read(root, image_size=1000)
    assert read(root, image_size=999).images.shape == (6, 3, 999, 999)
