"""The control probe: how likely a request's audio holds no answer, read off the prefix states.

Control items (silence, a noise bed, an unrelated recording under a question about sounds that
are not there) are where a confident answer is a guess. The LoRA fine-tuning does not learn to
say so (docs/sweeps.md, "Control items"), but the frozen hidden states entering the first LoRA
layer, which every posterior sample shares, tell such audio apart from answerable audio almost
perfectly (bench/linear_probe.py). The probe is a logistic regression on those states, fitted in
training (`training.eval.control_probe`) on the `pretrain` split's control and answerable
items, and stored beside the posterior:

    control_probe.safetensors   fp32 "mean" (F,), "scale" (F,), "weight" (F,), "bias" (1,)
    quaver.json "control_probe": {"file", "layer", "feature", "quarters", "fitted_on", ...}

Its feature is the mean of the audio-token states over each quarter of the clip, concatenated:
F = quarters * d. The audio tokens come before the question, so the feature (and P(control))
depends on the audio alone: it says "this audio sounds like nothing a question here is about",
not whether a particular question fits it. The "answerable" score (`app.scores`) multiplies the
served probability by 1 - P(control).

    probe = load_control_probe(posterior_dir, meta, first_layer=26, hidden_size=896)  # or None
    p = probe.p_control(h, batch.ids == audio_token_id)      # h (R, T, d) -> (R,) in [0, 1]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from app.posterior import PosteriorError, save_tensors

CONTROL_PROBE_FILE = "control_probe.safetensors"
FEATURE = "audio_quarter_means"  # the only feature so far (see module docstring)
QUARTERS = 4


def audio_quarter_means(
    h: torch.Tensor, audio_mask: torch.Tensor, quarters: int = QUARTERS
) -> torch.Tensor:
    """(R, T, d) states and (R, T) audio-token mask -> (R, quarters * d) fp32 features.

    Row r's n audio tokens (in order) split at i * n // quarters, i = 0..quarters: quarter i holds
    tokens i * n // quarters .. (i + 1) * n // quarters - 1, and its mean is the i-th block of d.
    A quarter without tokens (n < quarters) is zeros."""
    if h.ndim != 3 or audio_mask.shape != h.shape[:2]:
        raise ValueError(f"h {tuple(h.shape)} and audio_mask {tuple(audio_mask.shape)} differ")
    mask = audio_mask.to(torch.bool)
    n = mask.sum(1, keepdim=True)  # (R, 1)
    j = mask.cumsum(1) - 1  # (R, T): the index of each audio token among its row's audio tokens
    bounds = torch.arange(1, quarters, device=h.device) * n // quarters  # (R, quarters - 1)
    which = (j[..., None] >= bounds[:, None, :]).sum(-1)  # (R, T) quarter of each token
    onehot = torch.nn.functional.one_hot(which, quarters).to(torch.float32)  # (R, T, Q)
    onehot = onehot * mask[..., None]
    sums = torch.einsum("rtq,rtd->rqd", onehot, h.to(torch.float32))  # (R, Q, d)
    counts = onehot.sum(1).clamp(min=1.0)[..., None]  # (R, Q, 1)
    return (sums / counts).flatten(1)


@dataclass(frozen=True)
class ControlProbe:
    """Logistic regression P(control | features) on standardised audio-quarter means."""

    mean: torch.Tensor  # (F,) feature means of the training split
    scale: torch.Tensor  # (F,) their standard deviations (> 0)
    weight: torch.Tensor  # (F,) logit weights on the standardised features
    bias: float  # logit bias
    layer: int  # the decoder layer whose input states it reads (the first LoRA layer)
    quarters: int = QUARTERS
    info: Mapping | None = None  # what it was fitted on (quaver.json's entry; informational)

    def __post_init__(self) -> None:
        f = self.mean.shape
        if self.mean.ndim != 1 or self.scale.shape != f or self.weight.shape != f:
            raise ValueError(
                f"control probe tensors must share one shape (F,): mean {tuple(f)}, "
                f"scale {tuple(self.scale.shape)}, weight {tuple(self.weight.shape)}"
            )
        for name in ("mean", "scale", "weight"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"control probe {name} has NaN or infinite values")
        if not (self.scale > 0).all():
            raise ValueError("control probe scale must be positive")
        if f[0] % self.quarters:
            raise ValueError(f"control probe width {f[0]} is not a multiple of {self.quarters}")

    @property
    def hidden_size(self) -> int:
        return int(self.mean.shape[0]) // self.quarters

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(R, F) features -> (R,) logits of P(control)."""
        z = (features.to(torch.float32) - self.mean.to(features.device)) / self.scale.to(
            features.device
        )
        return z @ self.weight.to(features.device) + self.bias

    def p_control(self, h: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        """(R, T, d) prefix states and their (R, T) audio-token mask -> (R,) P(control)."""
        return torch.sigmoid(self.logits(audio_quarter_means(h, audio_mask, self.quarters)))

    def save(self, out_dir: str | Path) -> dict:
        """Write CONTROL_PROBE_FILE into `out_dir`; returns the quaver.json "control_probe"
        entry (the caller stores it)."""
        save_tensors(
            {
                "mean": self.mean.float().contiguous(),
                "scale": self.scale.float().contiguous(),
                "weight": self.weight.float().contiguous(),
                "bias": torch.tensor([float(self.bias)]),
            },
            Path(out_dir) / CONTROL_PROBE_FILE,
        )
        return {
            **dict(self.info or {}),
            "file": CONTROL_PROBE_FILE,
            "layer": self.layer,
            "feature": FEATURE,
            "quarters": self.quarters,
        }


def load_control_probe(
    posterior_dir: str | Path,
    meta: Mapping,
    *,
    first_layer: int,
    hidden_size: int | None = None,
) -> ControlProbe | None:
    """The probe a posterior directory stores (None when its quaver.json has no
    "control_probe"); PosteriorError when it is malformed or does not fit the model (the layer
    must be the posterior's first LoRA layer, the width `quarters * hidden_size`)."""
    entry = meta.get("control_probe")
    if not entry:
        return None
    p = Path(posterior_dir)
    path = p / str(entry.get("file", CONTROL_PROBE_FILE))
    if entry.get("feature", FEATURE) != FEATURE:
        raise PosteriorError(f"{path}: unknown control probe feature {entry.get('feature')!r}")
    if int(entry.get("layer", -1)) != first_layer:
        raise PosteriorError(
            f"{path}: the control probe reads layer {entry.get('layer')}, but the posterior's "
            f"first LoRA layer is {first_layer}"
        )
    if not path.is_file():
        raise PosteriorError(f"posterior {p} names a control probe but lacks {path.name}")
    try:
        t = load_file(path)
        probe = ControlProbe(
            mean=t["mean"],
            scale=t["scale"],
            weight=t["weight"],
            bias=float(t["bias"].reshape(-1)[0]),
            layer=first_layer,
            quarters=int(entry.get("quarters", QUARTERS)),
            info={k: v for k, v in entry.items() if k not in ("file", "layer", "quarters")},
        )
    except Exception as exc:  # safetensors raises several types for unreadable or corrupt files
        raise PosteriorError(f"cannot read the control probe {path}: {exc}") from exc
    if hidden_size is not None and probe.hidden_size != hidden_size:
        raise PosteriorError(
            f"{path}: the control probe is for hidden size {probe.hidden_size}, the model's is "
            f"{hidden_size}"
        )
    return probe
