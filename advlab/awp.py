"""`AWP`: adversarial weight perturbation (Wu et al., "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020).

For each selected parameter tensor w (by default every parameter with more than one
dimension, as the reference code's `diff_in_weights`):

    g = ∇w L_adv(w)
    w' = w + γ · ‖w‖ · g / (‖g‖ + 1e-20)

then the training gradient is taken at w', and w is restored. `AWP.perturbed` is a context
manager: the weights are w' inside the block and exactly w (the same tensors, the same bits)
after it, also when the block raises. The ascent gradient is taken with `torch.autograd.grad`,
so no `.grad` changes until your training backward inside the block. It composes with any
recipe: run the recipe's `step` inside the block.

Under DistributedDataParallel compute the AWP loss with the wrapped module (`ddp.module`):
the ascent is not a DDP forward then (no backward of it follows), and each rank takes the
direction of its own shard.

The reference code moves w by one SGD step of a proxy model and rescales the difference,
which is the same direction; it restores w by subtracting the difference after the optimizer
step, while advlab restores w before it (bit-exact, and weight decay sees w, not w').
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from advlab._checks import check_choice, check_nonnegative
from advlab._errors import AdvlabTypeError, AdvlabValueError, NonFiniteError
from advlab.sites import unwrap_model

__all__ = ["AWP", "ParamFilter"]

ParamFilter = Callable[[str, nn.Parameter], bool]
AWP_EPS = 1e-20  # the reference code's EPS in diff_in_weights


def _default_filter(name: str, p: nn.Parameter) -> bool:
    return p.dim() > 1


class AWP:
    """Adversarial weight perturbation on named parameters.

    Args:
        model: The model (a DDP / DataParallel wrapper is unwrapped to find the parameters).
        params: Which parameters to perturb: a list of dotted parameter names, or a
            predicate `(name, parameter) -> bool`; None = every trainable parameter with
            more than one dimension (weights, not biases or norms), as the reference code.
        gamma: γ, the size of the perturbation relative to each weight's norm (the paper's
            5e-3).
        on_nonfinite: `"raise"` (default): a NaN/inf loss or ascent gradient raises
            `NonFiniteError` before any weight changes; `"skip"`: the block runs at w,
            unperturbed, counted in `skipped_steps`.

    Examples:
        >>> import torch, advlab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1, 1])
        >>> loss = lambda: nn.functional.cross_entropy(model(x), y)
        >>> awp = advlab.AWP(model, gamma=5e-3)
        >>> before = model[0].weight.detach().clone()
        >>> with awp.perturbed(loss):
        ...     round(float((model[0].weight.detach() - before).norm() / before.norm()), 6)  # ‖w' - w‖ = γ‖w‖
        ...     loss().backward()  # the training gradient, taken at w'
        0.005
        >>> torch.equal(model[0].weight, before)  # w restored
        True
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str] | ParamFilter | None = None,
        *,
        gamma: float = 5e-3,
        on_nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AdvlabTypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}.")
        self.model = model
        self.gamma = check_nonnegative(gamma, "gamma")
        self.on_nonfinite = check_choice(on_nonfinite, ("raise", "skip"), "on_nonfinite")
        self.params = self._select(unwrap_model(model), params)
        self.skipped_steps = 0

    @staticmethod
    def _select(model: nn.Module, params: Sequence[str] | ParamFilter | None) -> dict[str, nn.Parameter]:
        named = dict(model.named_parameters())
        if params is None or callable(params):
            keep = params or _default_filter
            chosen = {n: p for n, p in named.items() if p.requires_grad and keep(n, p)}
        elif isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
            raise AdvlabTypeError(
                f"Expected `params` to be a list of parameter names, a predicate (name, parameter) -> bool, or None, "
                f"but got {type(params).__name__}."
            )
        else:
            unknown = [n for n in params if n not in named]
            if unknown:
                raise AdvlabValueError(
                    f"Expected `params` to name parameters of the model, but {unknown} are not among "
                    f"{list(named)[:8]}{' ...' if len(named) > 8 else ''}."
                )
            chosen = {n: named[n] for n in params}
        if not chosen:
            raise AdvlabValueError("Expected `params` to select at least one parameter, but it selected none.")
        return chosen

    def directions(self, loss: Tensor) -> dict[str, Tensor]:
        """The weight perturbation γ · ‖w‖ · g / (‖g‖ + 1e-20) of each selected parameter.

        Args:
            loss: Scalar loss at the current weights, to ascend (its graph is consumed).

        Returns:
            Parameter name -> perturbation, shaped like the parameter (zeros where a
            parameter gets no gradient).
        """
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise AdvlabValueError(f"Expected the AWP loss to be a scalar tensor, but got {got}.")
        if not loss.requires_grad:
            raise AdvlabValueError("Expected the AWP loss to depend on the perturbed parameters, but it has no graph.")
        names = list(self.params)
        grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
        out: dict[str, Tensor] = {}
        for name, g in zip(names, grads):
            w = self.params[name].detach()
            if g is None:
                out[name] = torch.zeros_like(w)
                continue
            out[name] = (self.gamma * w.norm() / (g.norm() + AWP_EPS)) * g
        return out

    @contextmanager
    def perturbed(self, loss: Callable[[], Tensor], *, scaler: Any | None = None) -> Iterator[dict[str, Tensor]]:
        """Inside the block the selected weights are w' = w + γ‖w‖ g/‖g‖; exactly w after it.

        Args:
            loss: Zero-argument callable returning the loss to ascend at w (for example the
                task loss of the batch, or a recipe's adversarial loss).
            scaler: A `torch.amp.GradScaler`: the ascent gradient is taken of the scaled loss
                (so float16 gradients do not underflow); the direction does not depend on it.

        Yields:
            Parameter name -> the perturbation added (empty when a non-finite step is skipped).
        """
        value = loss()
        finite = isinstance(value, Tensor) and bool(torch.isfinite(value.detach()).all())
        if finite and scaler is not None:
            value = scaler.scale(value)
        diffs = self.directions(value) if finite else {}
        if finite and not all(bool(torch.isfinite(d).all()) for d in diffs.values()):
            finite = False
        if not finite:
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    "Expected a finite AWP loss and weight gradient, but got NaN or inf; no weight was changed. "
                    "Pass on_nonfinite='skip' to run such steps unperturbed."
                )
            self.skipped_steps += 1
            diffs = {}
        saved = {n: self.params[n].detach().clone() for n in diffs}
        try:
            with torch.no_grad():
                for n, d in diffs.items():
                    self.params[n].add_(d)
            yield diffs
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    self.params[n].copy_(w)
