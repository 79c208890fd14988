"""On CUDA, the engine's predictions equal the CPU's (tiny random model, fp32, K samples).

    python bench/gpu_equivalence.py      # prints max |p_gpu - p_cpu| per case, exits 1 on failure
Noise is drawn on the CPU generator for both devices, so the draws are identical.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from app.family import build_model
from app.lora import PosteriorSampler
from app.predict import Predictor, Request
from bench.k_samples import random_posterior, shape_config, synthetic_loaded, synthetic_request


class CPUNoiseSampler(PosteriorSampler):
    """Draw on the CPU and move: the same samples on every device."""

    def draw(self, n, generator):
        dev = self.device
        self.device = torch.device("cpu")
        cpu_params = self.params
        self.params = {k: tuple(t.cpu() for t in v) for k, v in cpu_params.items()}
        try:
            out = super().draw(n, torch.Generator().manual_seed(int(generator.initial_seed())))
        finally:
            self.device, self.params = dev, cpu_params
        return {k: (a.to(dev), b.to(dev)) for k, (a, b) in out.items()}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    cfg = shape_config("tiny")
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = build_model(cfg, seed=0).to(device)
        post = random_posterior(model, list(range(8, 12)), rank=8)
        pred = Predictor(synthetic_loaded(model, torch.device(device)), post)
        pred.sampler = CPUNoiseSampler(post, torch.device(device), torch.float32)
        reqs = [
            Request(synthetic_request(cfg, s, 30, seed=i), k, seed=i)
            for i, (s, k) in enumerate([(3.0, 1), (7.5, 8), (10.0, 4)])
        ]
        results[device] = [p.sample_probs for p in pred.predict(reqs)]
    worst = max(
        float(np.abs(a - b).max()) for a, b in zip(results["cpu"], results["cuda"], strict=True)
    )
    print(f"max |p_cuda - p_cpu| over 3 requests (K=1, 8, 4): {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
