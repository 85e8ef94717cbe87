"""Cost of a forward pass: multiply-adds and parameters per module (He et al. 2016, Sec. 3.3 and 4.2).

fvcore's `FlopCountAnalysis` traces one forward pass and counts each operator it knows: a convolution or a
linear layer costs its multiply-adds (bias excluded), an eval-mode BatchNorm 2 per output element (scale and
shift), adaptive average pooling 1 per input element; ReLU, padding and slicing are free by its rules, and the
shortcut additions are operators it does not count. The same pass under PyTorch's `FlopCounterMode`, which
counts only convolutions and matrix products at 2 flops per multiply-add, cross-checks the convolution and
linear totals. Counting needs no data: fvcore traces the model on zeros in eval mode, FlopCounterMode runs it on
meta tensors (shapes only).
"""
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import xarray as xr
from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode

from .common import attrs, layer_coords, model_device, preserved_state, variable

# fvcore's names of the operators that are multiply-adds of a weight with the input, as FlopCounterMode's are.
MATRIX_OPERATORS = ("conv", "linear", "addmm", "mm", "matmul", "bmm", "einsum")

DEFINITION = ("multiply-adds of one forward pass per image in eval mode, counted by fvcore's FlopCountAnalysis "
              "(one multiply-add = one flop: convolutions and linear layers their multiply-adds without bias, "
              "eval-mode BatchNorm 2 per output element, adaptive average pooling 1 per input element, ReLU, "
              "padding and additions 0) and assigned to the module whose forward runs the operator, with the "
              "parameters each module holds itself; conv_fc_flops is the part from convolutions and matrix "
              "products, and total_flops_torch is torch.utils.flop_counter.FlopCounterMode's total divided by 2, "
              "as it counts 2 flops per multiply-add and only convolutions and matrix products")


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


@torch.no_grad()
def _torch_total(model: nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's flops, run on meta tensors: shapes alone decide the count, so nothing is computed."""
    meta = {name: torch.empty_like(tensor, device="meta")
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    with FlopCounterMode(display=False) as counter:
        torch.func.functional_call(model, meta, (x.to("meta"),))
    return counter.get_total_flops()


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
    """Multiply-adds (fvcore) and parameters per module, per operator and in total, per image.

    `input_shape` is the traced batch `(batch, channels, height, width)`; every count is divided by `batch`.
    The model is left as it came: modes restored, no hook left, weights untouched.
    """
    with preserved_state(model, bn_statistics=False):
        model.eval()
        x = _zeros(model, input_shape)
        by_module, unsupported = _fvcore_counts(model, x)
        torch_total = _torch_total(model, x)
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
                              "multiply-adds per image (fvcore)", "multiply-adds"),
            "params": variable("depth", np.array([own_params[n] for n in layers], dtype=np.int64),
                               "parameters", "1"),
            "flops_by_operator": variable("operator", np.array([by_operator[op] // batch for op in operators],
                                                               dtype=np.int64),
                                          "multiply-adds per image by operator (fvcore)", "multiply-adds"),
            "total_flops": variable((), sum(by_operator.values()) // batch, "flops per image of every operator "
                                    "fvcore counts (conv and fc multiply-adds, BN and pooling operations)", "flops"),
            "conv_fc_flops": variable((), conv_fc // batch,
                                      "multiply-adds per image of convolutions and matrix products (fvcore)",
                                      "multiply-adds"),
            "total_flops_torch": variable((), torch_total // 2 // batch,
                                          "multiply-adds per image (FlopCounterMode flops / 2)", "multiply-adds"),
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
