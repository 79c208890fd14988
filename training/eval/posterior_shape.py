"""How far a fine-tuning run moved: IVON's Hessian from `hess_init`, and the measured update size.

    from training.eval.posterior_shape import run_shape
    run_shape(run_dir / "posterior", init_from)   # {"update": {...}, "hessian": {...} | None}

Nominal step sizes say little across optimizers (IVON's lr is rescaled by hess_init and clipped,
AdamW's is normalised per entry), so the report compares what the runs did:
- `update`: the change of the LoRA weight delta, dW = scale * B @ A per adapted Linear (out, in),
  between the run's posterior mean and the adapter it started from (`init_from`; zero without
  one): its Frobenius norm summed over modules (`dw_fro`), relative to the start's (`dw_rel`,
  None from zero), and the RMS change of the factor entries (`factor_rms`); for a posterior
  with a std (IVON), `sample_spread`: the RMS over draws of ||dW(sample) - dW(mean)|| summed
  over modules, how far the served samples lie from the mean, to set beside `dw_fro`;
- `hessian` (IVON runs): the last epoch's `IVON.hessian_stats()` from the run's log.jsonl (h's
  median, the median of h/h0 - 1, the share of entries that moved more than 1 %, the posterior
  std's median), i.e. whether the posterior is shaped by the data or is still its prior.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.posterior import Posterior, load_posterior
from training.stages.loop import read_log


def _deltas(mean: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """{module: scale * B @ A}, (out, in) fp32, from LoRA factors `mean` of `spec`'s modules."""
    return {
        m: spec.scale * (mean[f"{m}.lora_B.weight"] @ mean[f"{m}.lora_A.weight"])
        for m in spec.modules
    }


SPREAD_DRAWS = 8  # weight samples behind `sample_spread` (the served K)


def sample_spread(post: Posterior, draws: int = SPREAD_DRAWS, seed: int = 0) -> float | None:
    """RMS over `draws` samples theta ~ N(mean, std^2) of ||dW(theta) - dW(mean)||_F summed in
    quadrature over modules; None when every std is zero (a point estimate such as AdamW's)."""
    if not any(float(v.max()) > 0 for v in post.std.values()):
        return None
    gen = torch.Generator().manual_seed(seed)
    at_mean = _deltas(post.mean, post.spec)
    total = 0.0
    for _ in range(draws):
        theta = {
            k: m + post.std[k] * torch.randn(m.shape, generator=gen) for k, m in post.mean.items()
        }
        sampled = _deltas(theta, post.spec)
        total += sum(float((sampled[m] - at_mean[m]).square().sum()) for m in at_mean)
    return (total / draws) ** 0.5


def update_size(post: Posterior, start: Posterior | None) -> dict[str, float | None]:
    """dw_fro, dw_rel, factor_rms and sample_spread of `post`'s mean against `start`'s (None:
    zero weights)."""
    if start is not None and set(start.spec.modules) != set(post.spec.modules):
        raise ValueError("the two posteriors adapt different modules")
    # No start: zero factors, so dW starts at 0 and every factor entry's change is itself.
    first = {k: torch.zeros_like(v) for k, v in post.mean.items()} if start is None else start.mean
    after = _deltas(post.mean, post.spec)
    before = _deltas(first, post.spec if start is None else start.spec)
    moved = sum(float((after[m] - before[m]).square().sum()) for m in after) ** 0.5
    base = sum(float(before[m].square().sum()) for m in before) ** 0.5
    diffs = torch.cat([(post.mean[k] - first[k]).flatten() for k in post.mean])
    return {
        "dw_fro": moved,
        "dw_rel": moved / base if base > 0 else None,
        "factor_rms": float(diffs.square().mean().sqrt()),
        "sample_spread": sample_spread(post),
    }


def hessian_movement(run_dir: Path) -> dict | None:
    """The last logged `hessian` stats of an IVON run (with the posterior std's), or None."""
    records = [r for r in read_log(Path(run_dir)) if "hessian" in r]
    if not records:
        return None
    return {"epoch": records[-1].get("epoch"), **records[-1]["hessian"]}


def run_shape(post_dir: Path, init_from: Path | None) -> dict:
    """{"update": update_size, "hessian": hessian_movement or None} of one finished run."""
    post = load_posterior(post_dir)
    start = load_posterior(init_from) if init_from is not None else None
    return {"update": update_size(post, start), "hessian": hessian_movement(Path(post_dir).parent)}
