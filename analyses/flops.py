"""Cost of a model: multiply-adds and parameters per module (He et al. 2016, Sec. 3.3 and 4.2), per image.

Each count says what it counts:
- `conv_fc_flops`: the multiply-adds of the convolutions and fc layers of one forward pass, bias excluded: the
  "FLOPs (multiply-adds)" of He et al.'s cost comparisons.
- `total_flops`: fvcore's total, which adds to those an eval-mode BatchNorm's 2 operations per output element
  (scale and shift) and adaptive average pooling's 1 per input element; ReLU, padding and slicing are free by
  its rules, and the shortcut additions are operators it does not count. Not multiply-adds: a mix of operations.
- `total_flops_torch`: PyTorch's `FlopCounterMode` on the same forward pass, which counts only convolutions and
  matrix products at 2 flops per multiply-add, halved: a cross-check of `conv_fc_flops`.
- `train_conv_fc_flops`: a training step by the usual convention, forward + backward = 3 x `conv_fc_flops`
  (the backward pass computes the gradients of each layer's input and of its weights, each as costly as the
  forward product).
- `train_flops_torch`: the same measured by `FlopCounterMode` over a training-mode forward and the backward of
  the summed logits, halved; it is a little below the convention, as no gradient of the input image is needed.
Counting needs no data: fvcore traces the model on zeros in eval mode, FlopCounterMode runs it on meta tensors
(shapes only).
"""
import warnings
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import xarray as xr
from torch.utils.flop_counter import FlopCounterMode

with warnings.catch_warnings():  # fvcore imports torch.jit.script, which this torch deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis

from .common import attrs, layer_coords, model_device, preserved_state, variable

# fvcore's names of the operators that are multiply-adds of a weight with the input, as FlopCounterMode's are.
MATRIX_OPERATORS = ("conv", "linear", "addmm", "mm", "matmul", "bmm", "einsum")

FVCORE_UNITS = "fvcore flops (a multiply-add counts 1)"
DEFINITION = ("operations per image of one eval-mode forward pass counted by fvcore's FlopCountAnalysis (a "
              "multiply-add of a convolution or linear layer counts 1, bias excluded; eval-mode BatchNorm 2 per "
              "output element; adaptive average pooling 1 per input element; ReLU, padding and additions 0) and "
              "assigned to the module whose forward runs the operator, with the parameters each module holds "
              "itself; conv_fc_flops = the multiply-adds of convolutions and matrix products alone (He et al.'s "
              "FLOPs), total_flops = fvcore's total of every counted operator, total_flops_torch = "
              "torch.utils.flop_counter.FlopCounterMode's flops of the same forward pass / 2 (it counts 2 per "
              "multiply-add, convolutions and matrix products only); per training step, train_conv_fc_flops = 3 x "
              "conv_fc_flops (forward + backward, the backward computing input and weight gradients at one forward "
              "each, by convention) and train_flops_torch = FlopCounterMode's flops of a training-mode forward and "
              "the backward of the summed logits / 2 (every parameter trained, no gradient for the input)")


def _zeros(model: nn.Module, input_shape) -> torch.Tensor:
    if len(input_shape) < 2:
        raise ValueError(f"input_shape is (batch, channels, ...), not {tuple(input_shape)}")
    return torch.zeros(tuple(input_shape), device=model_device(model), dtype=next(model.parameters()).dtype)


@torch.no_grad()
def _fvcore_counts(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Counter], Counter]:
    """Flops per module (its descendants included) and operator, and the operators fvcore could not count."""
    analysis = (FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                .tracer_warnings("none"))
    return analysis.by_module_and_operator(), analysis.unsupported_ops()


def _torch_counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FlopCounterMode's flops of a training-mode forward pass and of the backward of its summed logits, on meta
    tensors: shapes alone decide the count, so nothing is computed and the model's own tensors are not touched.
    Convolutions and matrix products cost the same in either mode, so the forward count is eval mode's too. Two
    images per image asked for (a 1x1 map of one image is no batch to BatchNorm in training mode), the counts
    halved: they are linear in the batch."""
    parameters = {name: torch.empty_like(tensor, device="meta").requires_grad_()
                  for name, tensor in model.named_parameters()}
    buffers = {name: torch.empty_like(tensor, device="meta") for name, tensor in model.named_buffers()}
    model.train()
    with FlopCounterMode(display=False) as forward:
        logits = torch.func.functional_call(model, {**parameters, **buffers}, (torch.cat([x, x]).to("meta"),))
    with FlopCounterMode(display=False) as backward:
        logits.sum().backward()
    return forward.get_total_flops() // 2, backward.get_total_flops() // 2


def _own_counts(model: nn.Module, by_module: dict[str, Counter]) -> tuple[list[str], dict, Counter]:
    """Modules in registration order (forward order in this package's models and torchvision's) that hold
    parameters or run counted operators in their own forward; their own flops (a module's count minus its
    children's) and own parameters, so that both sum exactly to the model's totals."""
    own_params = Counter()
    for name, parameter in model.named_parameters():
        own_params[name.rpartition(".")[0]] += parameter.numel()

    def flops(name: str) -> int:
        return sum(by_module.get(name, Counter()).values())

    own_flops = {name: flops(name) - sum(flops(f"{name}.{child}" if name else child)
                                         for child, _ in module.named_children())
                 for name, module in model.named_modules()}
    layers = [name for name in own_flops if own_flops[name] or own_params[name]]
    return layers, own_flops, own_params


def flop_count(model: nn.Module, input_shape=(1, 3, 32, 32), *, checkpoint=None, dataset=None) -> xr.Dataset:
    """Operations (fvcore) and parameters per module, per operator and in total, and the multiply-adds of the
    convolutions and fc layers forward and per training step (see the module's docstring), per image.

    `input_shape` is the traced batch `(batch, channels, height, width)`; every count is divided by `batch`.
    The model is left as it came: modes restored, no hook left, weights untouched.
    """
    with preserved_state(model, bn_statistics=False):
        model.eval()
        x = _zeros(model, input_shape)
        by_module, unsupported = _fvcore_counts(model, x)
        torch_forward, torch_backward = _torch_counts(model, x)
    batch = x.shape[0]
    layers, own_flops, own_params = _own_counts(model, by_module)
    modules = dict(model.named_modules())
    by_operator = by_module[""]
    operators = sorted(by_operator)
    conv_fc = sum(by_operator[op] for op in MATRIX_OPERATORS)
    coords = {**layer_coords(layers), "kind": ("depth", np.array([type(modules[n]).__name__ for n in layers],
                                                                 dtype=object)),
              "operator": ("operator", np.array(operators, dtype=object))}
    return xr.Dataset(
        {
            "flops": variable("depth", np.array([own_flops[n] // batch for n in layers], dtype=np.int64),
                              "operations per image in the module's own forward, as fvcore counts them (conv "
                              "and fc: multiply-adds; BN: 2 per output element; pooling: 1 per input element)",
                              FVCORE_UNITS),
            "params": variable("depth", np.array([own_params[n] for n in layers], dtype=np.int64),
                               "parameters", "1"),
            "flops_by_operator": variable("operator", np.array([by_operator[op] // batch for op in operators],
                                                               dtype=np.int64),
                                          "operations per image by operator, as fvcore counts them", FVCORE_UNITS),
            "total_flops": variable((), sum(by_operator.values()) // batch, "operations per image of every "
                                    "operator fvcore counts: conv and fc multiply-adds plus BN and pooling "
                                    "operations", FVCORE_UNITS),
            "conv_fc_flops": variable((), conv_fc // batch, "multiply-adds per image of the convolutions and fc "
                                      "layers, forward (fvcore; He et al.'s FLOPs)", "multiply-adds"),
            "total_flops_torch": variable((), torch_forward // 2 // batch, "multiply-adds per image of the "
                                          "convolutions and matrix products, forward (FlopCounterMode flops / 2)",
                                          "multiply-adds"),
            "train_conv_fc_flops": variable((), 3 * (conv_fc // batch), "multiply-adds per image of a training "
                                            "step through the convolutions and fc layers by convention: forward + "
                                            "backward = 3 x conv_fc_flops", "multiply-adds"),
            "train_flops_torch": variable((), (torch_forward + torch_backward) // 2 // batch, "multiply-adds per "
                                          "image of a training step through the convolutions and matrix products, "
                                          "forward + backward as FlopCounterMode counts them (flops / 2)",
                                          "multiply-adds"),
            "total_params": variable((), sum(own_params.values()), "parameters", "1"),
        },
        coords=coords,
        attrs=attrs(DEFINITION, checkpoint=checkpoint, dataset=dataset, input_shape="x".join(map(str, x.shape[1:])),
                    bn_mode="eval", counted_operators=", ".join(operators),
                    skipped_operators=", ".join(sorted(unsupported))),
    )


def total_cost(model: nn.Module, input_shape=(1, 3, 32, 32)) -> tuple[int, int]:
    """(multiply-adds of the convolutions and fc layers per image, parameter count): the FLOPs and parameters
    of the paper's cost comparisons (He et al. count conv and fc multiply-adds, not BN or pooling)."""
    with preserved_state(model, bn_statistics=False):
        model.eval()
        x = _zeros(model, input_shape)
        by_module, _ = _fvcore_counts(model, x)
    conv_fc = sum(by_module[""][op] for op in MATRIX_OPERATORS)
    return conv_fc // x.shape[0], sum(p.numel() for p in model.parameters())
