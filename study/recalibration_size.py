"""How many training images the recomputed statistics need: `python study/recalibration_size.py RUN:EPOCH ...`
(default: the study's spike epochs) prints, per checkpoint, the validation loss on its run's first 2,000
validation images with statistics recomputed over the first N training images (the trainer's recalibration:
augmented once as the run trained, in the run's batches), and the excess of the running statistics over it.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analyses.evaluate import predict  # noqa: E402
from analyses.monitor import attribute, recalibrated_predictions  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train import datasets  # noqa: E402
from train.batches import EvalBatches, recalibration_inputs  # noqa: E402

SIZES = (128, 256, 512, 1024, 2000)
DEFAULT = ["plain20-s0:1", "plain20-s0:4", "resnet20-s1:2", "plain20-s3:4"]  # the largest spikes and an early epoch


def main(checkpoints: list[str], root: Path = Path("runs/study")) -> None:
    torch.set_num_threads(1)
    for text in checkpoints:
        run, epoch = text.split(":")
        loaded = ckpt.load(root / run / f"epoch_{int(epoch):03d}.pt")
        config = loaded.config
        train, val = (datasets.load_split(config["dataset"], split, config["data_dir"], config["val_split"])
                      for split in ("train", "val"))
        batches = EvalBatches(val[:2000], loaded.spec, 256, "cpu")
        running = predict(loaded.model.eval(), batches)
        cells = []
        for n in SIZES:
            inputs = recalibration_inputs(train[:n], loaded.spec, config["augment"], config["batch_size"], "cpu")
            result = attribute(running, recalibrated_predictions(loaded.model, batches, inputs)[0])
            cells.append(f"{n}: {result.loss_recalibrated:.4f} ({result.excess:+.3f})")
        print(f"{run} epoch {epoch}  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
