"""Per-row posterior samples of LoRA weights, without editing weights per request.

At load, the posterior mean is merged into the base weights once (`W' = W + s * mB @ mA`), so the
posterior-mean path costs exactly a plain deterministic pass. Each LoRA target is then wrapped in a
`PosteriorLinear`, which adds, for the batch rows that carry a posterior sample, only that sample's
deviation from the mean:

    B_k A_k - mB mA = [B_k | -mB] @ [A_k ; mA]        (rank at most 2r)
    y[row] = x[row] @ W'^T + s * (x[row] @ [A_k ; mA]^T) @ [B_k | -mB]^T

with A_k = mA + sA * eps, B_k = mB + sB * eps drawn independently (as in training). The samples of
one forward pass live in a `SampleSet` bound to a context variable for the duration of the call:
weights are never mutated, so concurrent forward passes in different threads are safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from app.posterior import Posterior


@dataclass
class SampleSet:
    """The posterior samples of one forward pass.

    rows: (n,) int64 indices of the batch rows that carry a sample (the others run at the mean).
    factors: module path -> (A (n, 2r, in), B (n, out, 2r)) deviation factors, scale folded into B.
    every_row: True when `rows` is 0..n-1 of an n-row batch (every row a sample, in order), so
    the deviations are added without gathering and scattering rows.
    """

    rows: torch.Tensor
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    every_row: bool = False


_ACTIVE: ContextVar[SampleSet | None] = ContextVar("quaver_lora_samples", default=None)


@contextlib.contextmanager
def active_samples(samples: SampleSet | None) -> Iterator[None]:
    """Bind `samples` to forward passes run inside this block (this thread/context only)."""
    token = _ACTIVE.set(samples)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class PosteriorLinear(nn.Module):
    """A Linear with the LoRA mean merged in, plus per-row sampled deviations when active."""

    def __init__(
        self, base: nn.Linear, name: str, merged: tuple[torch.Tensor, torch.Tensor, float]
    ) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.merged = merged  # (mA (r, in), mB (out, r), scale): what `base.weight` carries

    def merged_delta(self) -> torch.Tensor:
        """s * mB @ mA in float64 on the weight's device: (out, in)."""
        m_a, m_b, scale = self.merged
        return (scale * (m_b.double() @ m_a.double())).to(self.base.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        y = self.base(x)
        samples = _ACTIVE.get()
        if samples is None or self.name not in samples.factors:
            return y
        a, b = samples.factors[self.name]  # (n, 2r, in), (n, out, 2r)
        if samples.every_row and x.shape[0] == a.shape[0]:  # the K-sample pass of evaluation
            return y.add_(torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)).to(y.dtype))
        xs = x.index_select(0, samples.rows)  # (n, T, in)
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))  # (n, T, out)
        return y.index_add(0, samples.rows, delta.to(y.dtype))


def attach_posterior(model: nn.Module, posterior: Posterior) -> dict[str, PosteriorLinear]:
    """Merge the posterior mean into `model`'s weights and wrap every LoRA target (once, at load).

    Returns the wrappers by module path. Until `detach_posterior`, the model must not be shared
    with code expecting the un-merged base weights.
    """
    spec = posterior.spec
    modules = dict(model.named_modules())
    wrappers = {}
    for name in spec.modules:
        lin = modules[name]
        if isinstance(lin, PosteriorLinear):
            raise ValueError(f"{name} already carries a posterior")
        m_a, _ = posterior.factor(name, "A")
        m_b, _ = posterior.factor(name, "B")
        wrapper = PosteriorLinear(lin, name, (m_a, m_b, spec.scale))
        with torch.no_grad():  # (out, in), merged in float64
            lin.weight.copy_((lin.weight.double() + wrapper.merged_delta()).to(lin.weight.dtype))
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name], leaf, wrapper)
        wrappers[name] = wrapper
    return wrappers


class PosteriorSampler:
    """Draws deviation factors for sample rows, on the model's device and dtype."""

    def __init__(self, posterior: Posterior, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = posterior.spec
        self.device, self.dtype = device, dtype
        self.params = {}
        for name in self.spec.modules:
            m_a, s_a = posterior.factor(name, "A")
            m_b, s_b = posterior.factor(name, "B")
            self.params[name] = tuple(
                t.to(device=device, dtype=torch.float32) for t in (m_a, s_a, m_b, s_b)
            )

    def draw(
        self, n: int, generator: torch.Generator
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """n independent posterior samples -> per-module factors A (n, 2r, in), B (n, out, 2r)."""
        out = {}
        scale = self.spec.scale
        for name, (m_a, s_a, m_b, s_b) in self.params.items():
            eps_a = torch.randn((n, *m_a.shape), generator=generator, device=self.device)
            eps_b = torch.randn((n, *m_b.shape), generator=generator, device=self.device)
            a_k = m_a + s_a * eps_a  # (n, r, in)
            b_k = m_b + s_b * eps_b  # (n, out, r)
            a = torch.cat([a_k, m_a.expand(n, -1, -1)], dim=1)  # (n, 2r, in)
            b = scale * torch.cat([b_k, -m_b.expand(n, -1, -1)], dim=2)  # (n, out, 2r)
            out[name] = (a.to(self.dtype), b.to(self.dtype))
        return out


def concat_factors(parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict:
    """Stack the factors of several requests along the sample-row dimension."""
    if len(parts) == 1:
        return parts[0]
    return {
        name: (torch.cat([p[name][0] for p in parts]), torch.cat([p[name][1] for p in parts]))
        for name in parts[0]
    }


def detach_posterior(model: nn.Module) -> int:
    """Undo `attach_posterior`: subtract the merged mean and put the plain Linear layers back.

    The model then holds its base weights again (to rounding: the mean is added and subtracted
    in float64, each weight rounded once per step) and can take another posterior. Returns the
    number of layers unwrapped.
    """
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, PosteriorLinear):
                w = child.base.weight
                with torch.no_grad():
                    w.copy_((w.double() - child.merged_delta()).to(w.dtype))
                setattr(module, child_name, child.base)
                count += 1
    return count
