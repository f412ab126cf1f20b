"""M copies of one MIL architecture as one model with grouped weights, so M training runs (the folds ×
seeds of a cross-validation) take their steps together.

`stack_mil` copies the first model's module tree and swaps its parametrised leaves for grouped versions
whose parameters carry a leading run axis M: `nn.Linear` → `StackedLinear` (weight (M, in, out), one
batched matrix product for all runs), `Standardized` → per-run statistics, `nn.Dropout` → `StackedDropout`
(each run's masks from its own generator). The model's own ``forward`` then runs unchanged on a batch of
M·B bags, run-major (rows m·B … m·B + B − 1 are run m's): its per-bag operations (masked softmax,
pooling, top-k) never mix bags, and every grouped layer maps run m's rows with run m's weights. So the
stacked model is the M models side by side, and it is exact: a bag's output is what its run's own model
gives (to float rounding), padding included.

This holds for models whose forward uses its layers only by calling them on (bags, …) tensors: mean
pooling, ABMIL and CLAM-SB (`STACKABLE`). TransMIL runs each bag alone on its own token grid and holds
LayerNorms, convolutions and a class token; CLAM-MB multiplies by its classifier's weight matrix
directly. `stack_mil` raises `NotStackable` saying why, and callers train such runs one at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from histodistill.models.mil import ABMIL, CLAMMB, CLAMSB, MeanPoolMIL, Standardized, TransMIL

STACKABLE = (MeanPoolMIL, ABMIL, CLAMSB)
WHY_NOT = {
    TransMIL: "TransMIL runs each bag alone on its own token grid (and holds LayerNorms, convolutions "
    "and a class token)",
    CLAMMB: "CLAM-MB multiplies by its classifier's weight matrix directly",
}


class NotStackable(ValueError):
    """The models cannot be trained as one stacked model (the message says why)."""


class StackedLinear(nn.Module):
    """M `nn.Linear` layers: ``weight`` (M, in, out), i.e. each run's weight transposed, so the batched
    products read and write contiguous memory (forward and gradients); ``bias`` (M, out). Input (M·B, …, in),
    run-major."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().t() for layer in layers]))
        self.bias = (
            None
            if layers[0].bias is None
            else nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self.weight.shape[0]
        if x.ndim < 2 or x.shape[0] % runs:
            raise ValueError(
                f"a stacked layer of {runs} runs needs (M·B, …, in) inputs, got {tuple(x.shape)}"
            )
        rows = x.reshape(runs, -1, x.shape[-1])  # (M, B·…, in): run m's rows are contiguous
        out = (
            torch.bmm(rows, self.weight)
            if self.bias is None
            else torch.baddbmm(self.bias[:, None], rows, self.weight)
        )
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (M·B, …, out)


class StackedStandardized(nn.Module):
    """M `Standardized` wrappers: per-run ``mean``, ``std`` (M, D) around the stacked inner model."""

    def __init__(self, models: Sequence[Standardized], inner: nn.Module) -> None:
        super().__init__()
        self.mil = inner
        self.register_buffer("mean", torch.stack([m.mean for m in models]))
        self.register_buffer("std", torch.stack([m.std for m in models]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        runs = self.mean.shape[0]
        grouped = x.reshape(runs, -1, *x.shape[1:])  # (M, B, N, D)
        standardized = (grouped - self.mean[:, None, None]) / self.std[:, None, None]
        return self.mil(standardized.reshape(x.shape), mask)


class StackedDropout(nn.Module):
    """M `nn.Dropout` layers whose masks are drawn from each run's own generator, in the shape the run's
    own model would draw them: ``(B_m, N_m, …)`` for its B_m bags padded to their longest N_m, where the
    stacked batch pads every run to a common B and N (``x`` is (M·B, N, …), or (M·B, F) after pooling).

    So on the CPU every run gets the very masks that training it alone with its generator gives
    (`torch.nn.functional.dropout`: Bernoulli(1 − p) noise divided by 1 − p). ``shapes`` (set before each
    training forward by the trainer) gives each run's (B_m, N_m), or None for a run without bags this step
    (nothing is drawn for it). Without ``generators`` (on a GPU) one mask is drawn for all runs from the
    default generator: the same distribution, other draws.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generators: list[torch.Generator] | None = None
        self.shapes: list[tuple[int, int] | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0.0
        if self.generators is None:
            return nn.functional.dropout(x, self.p, training=True)
        # Each run draws into its (B_m, N_m, …) corner of the mask: a strided view, drawn in the order of a
        # contiguous tensor of that shape. Padding and empty slots keep 0 (their outputs are never used).
        mask = torch.zeros_like(x)
        per_run = x.shape[0] // len(self.generators)
        for m, (generator, shape) in enumerate(zip(self.generators, self.shapes, strict=True)):
            if shape is not None:
                bags, length = shape
                rows = mask[m * per_run : m * per_run + bags]
                (rows[:, :length] if x.ndim >= 3 else rows).bernoulli_(1 - self.p, generator=generator)
        return x * mask.div_(1 - self.p)


def stack_mil(models: Sequence[nn.Module]) -> nn.Module:
    """One model holding ``models`` (same architecture and sizes) as grouped weights; see the module's doc.
    Raises `NotStackable` for a module it cannot group (the message names it)."""
    if len({tuple((k, v.shape) for k, v in m.state_dict().items()) for m in models}) > 1:
        raise NotStackable("the runs' models differ in architecture or sizes")
    inner = models[0].mil if isinstance(models[0], Standardized) else models[0]
    if type(inner) not in STACKABLE:
        raise NotStackable(
            WHY_NOT.get(
                type(inner),
                f"{type(inner).__name__} is not among the stackable models "
                f"({', '.join(t.__name__ for t in STACKABLE)})",
            )
        )
    return _stack(list(models), "")


def _stack(modules: list[nn.Module], path: str) -> nn.Module:
    first = modules[0]
    if isinstance(first, nn.Linear):
        return StackedLinear(modules)
    if isinstance(first, nn.Dropout):
        return StackedDropout(first.p)
    if isinstance(first, Standardized):
        return StackedStandardized(modules, _stack([m.mil for m in modules], f"{path}mil."))
    if own := [name for name, _ in first.named_parameters(recurse=False)] + [
        name for name, _ in first.named_buffers(recurse=False)
    ]:
        raise NotStackable(f"{type(first).__name__} {path or 'model'} holds its own {', '.join(own)}")
    # A parameter-free module (ReLU, a container, the MIL model's own class) keeps its forward and attributes;
    # only its children are swapped for grouped ones.
    stacked = copy.copy(first)
    stacked._parameters, stacked._buffers = {}, {}
    stacked._modules = {
        name: _stack([getattr(m, name) for m in modules], f"{path}{name}.") for name in first._modules
    }
    return stacked


def unstack_state(stacked: nn.Module, run: int) -> dict[str, torch.Tensor]:
    """Run ``run``'s parameters as the state-dict entries of its own model (same names and layout), cloned."""
    state = {}
    for prefix, module in stacked.named_modules():
        for name, value in module.named_parameters(prefix=prefix, recurse=False):
            one = value[run].detach()
            state[name] = (
                one.t() if isinstance(module, StackedLinear) and name.endswith("weight") else one
            ).clone()
    return state


def set_dropout(
    stacked: nn.Module,
    generators: list[torch.Generator] | None,
    shapes: list[tuple[int, int] | None] | None = None,
) -> None:
    """Give every `StackedDropout` the runs' generators and this step's per-run (B_m, N_m) shapes."""
    for module in stacked.modules():
        if isinstance(module, StackedDropout):
            module.generators = generators
            module.shapes = shapes or []
