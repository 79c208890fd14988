"""IVON (Improved Variational Online Newton): Quaver's variational optimizer, from the equations.

IVON learns a diagonal Gaussian posterior q(theta) = N(m, diag(s^2)) over the trainable weights,
with `s = 1 / sqrt(ess * (h + wd))`: `m` lives in the parameters, `h` is a running diagonal
Hessian estimate kept by the optimizer (initialised to `hess_init`), `ess` the effective sample
size (inverse temperature) and `wd` both weight decay and prior precision. Written from the
IVON paper (Shen, Daheim et al., ICML 2024, arXiv 2402.17641).

Use::

    opt = IVON(model.named_parameters(), lr=0.03, ess=1e7, hess_init=1e-3, seed=0)
    for batch in loader:
        opt.zero_grad(set_to_none=True)
        for _ in range(opt.mc_samples):          # and/or several micro-batches
            with opt.sampled_params(train=True):  # params hold theta = m + s * eps here
                loss = loss_fn(model(batch))
                loss.backward()
        opt.step()                               # uses the gradients of all blocks above
    std = opt.posterior_stds()                   # {param name: s (fp32)} for export
    print(opt.hessian_stats())                   # how far h moved from hess_init

One step, per parameter tensor (all fp32; t counts the steps of that tensor):

1. every `sampled_params(train=True)` block draws `eps ~ N(0, I)`, writes `theta = m + s * eps`
   into the parameter, and on exit records `g` (the gradient of that block) and
   `(theta - m) * g`; `step()` averages both over the blocks since the last step;
2. `mom = beta1 * mom + (1 - beta1) * g`;
3. `h_hat = ess * (h + wd) * mean((theta - m) * g)` ("price", reparameterisation) or
   `h_hat = ess * mean(g^2)` ("gradsq");
4. `h = beta2 * h + (1 - beta2) * h_hat + 0.5 * (1 - beta2)^2 * (h - h_hat)^2 / (h + wd)`,
   then `h >= precision_floor * (hess_init + wd) - wd`. In exact arithmetic the update keeps
   `h + wd > 0` but may halve it at every step, so with beta2 ~ 0.999 a few entries can creep
   towards -wd (and rounding can cross it), blowing up their std: the floor stops that;
5. `m = m - lr_eff * clip((mom / (1 - beta1^t) + wd * m) / (h + wd), -clip_radius, clip_radius)`
   with `lr_eff = lr * (hess_init + wd)` when `rescale_lr` (the reference's default), else `lr`.

Behaviour worth knowing:

- State (momentum, h, accumulators) is fp32 whatever the parameter dtype. A bf16/fp16 parameter
  gets an fp32 master copy of its mean (`state["mean"]`); the parameter holds its cast. If the
  parameter is overwritten from outside, the master follows it at the next sampled block.
- `sampled_params` restores the mean on exit even when its body raises; a block that raises
  contributes nothing. Blocks cannot be nested; the optimizer is not safe for concurrent use
  (sampled weights are written into the model; the server samples LoRA weights per row instead).
- Gradients: on entry a block sets aside the parameters' `.grad` and starts from None; on exit it
  reads the block's own gradient, then puts back set-aside + block gradient (ordinary torch
  accumulation). So `zero_grad` once per step or inside every block both work. Gradient
  clipping or scaling must happen inside the block, after `backward`: IVON reads the gradient
  when the block exits. A train block in which no parameter received a gradient is ignored.
- A parameter that requires grad but received no gradient in any block of a step is skipped:
  its mean and state stay untouched (as torch optimizers do with `grad is None`). If it received
  a gradient in some blocks only, the other blocks count as a zero gradient.
- Parameters with `requires_grad=False` are neither sampled nor updated.
- `step()` without any train block since the last step raises RuntimeError. `step(closure)` runs
  `mc_samples` sampled blocks itself; the closure must compute the loss and call `backward`.
- Noise comes from the optimizer's own generator (one per device), seeded with `seed` (default
  `torch.initial_seed()`), or from a `generator` you pass. Under torch.distributed the owned
  generator's seed is mixed with the rank so that ranks draw different noise. The generator
  state is in `state_dict()`, as are the per-tensor step counts, so a resume is bit-exact.
  Bit-exact DDP resume needs each rank to load the state it saved; a rank that loads another
  rank's state re-seeds its noise from (seed, rank, step).
- DDP (`sync=True` with torch.distributed initialised): the averaged `g` and `(theta - m) * g`
  (or `g^2`) are all-reduced (mean over ranks) before the updates, so every rank keeps the same
  `m` and `h`. The caller must keep DDP from all-reducing gradients in backward (run the blocks
  under `ddp_model.no_sync()`, or train the plain module): each rank's gradient must belong to
  its own noise draw.
- Names for export: build the optimizer from `named_parameters()` (torch stores them as
  `param_names` in each group) or pass `names=` (a `{param: name}` map or `(name, param)` pairs)
  to `posterior_stds`/`posterior_means`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

HESS_APPROXES = ("price", "gradsq")
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: rank r uses seed + r * _SEED_MIX (mod 2^64)
_FP32_STATE = ("momentum", "hess", "mean", "grad_sum", "nxg_sum", "gsq_sum")
_ACCUMULATORS = ("grad_sum", "nxg_sum", "gsq_sum")


def _rank_seed(seed: int, rank: int, salt: int = 0) -> int:
    """A 64-bit seed for `rank` (rank 0 keeps `seed` itself when salt is 0)."""
    return (seed + rank * _SEED_MIX + salt * (_SEED_MIX >> 1)) % 2**64


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


class IVON(torch.optim.Optimizer):
    """Improved Variational Online Newton over a diagonal Gaussian posterior.

    Args:
        params: tensors, `(name, tensor)` pairs (names are kept for export) or param groups.
            Per-group overrides: lr, ess, hess_init, beta1, beta2, weight_decay, clip_radius,
            rescale_lr.
        lr: learning rate of the mean.
        ess: effective sample size (lambda), the posterior's inverse temperature; > 0.
        hess_init: initial Hessian estimate h0 > 0; the initial std is 1/sqrt(ess*(h0+wd)).
        beta1: momentum of the gradient, in [0, 1).
        beta2: decay of the Hessian estimate, in [0, 1] (1 keeps h at hess_init).
        weight_decay: weight decay = prior precision delta, >= 0.
        clip_radius: elementwise clip of the preconditioned step, > 0 (inf: no clipping).
        mc_samples: sampled blocks per step used by `step(closure)`; training loops read it.
        rescale_lr: multiply lr by (hess_init + wd) (the reference's default mode); LoRA recipes
            turn it off and use lr ~0.03.
        hess_approx: "price" (reparameterisation, default) or "gradsq".
        seed: seed of the optimizer's own noise generator (default torch.initial_seed()).
        generator: use this generator for the noise instead (same device as the params);
            exclusive with `seed`.
        sync: all-reduce the averaged statistics over torch.distributed ranks at each step.
        precision_floor: keeps h + wd >= precision_floor * (hess_init + wd); in (0, 1).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        clip_radius: float = float("inf"),
        mc_samples: int = 1,
        rescale_lr: bool = True,
        hess_approx: str = "price",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sync: bool = False,
        precision_floor: float = 1e-4,
    ) -> None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}")
        if hess_approx not in HESS_APPROXES:
            raise ValueError(f"hess_approx must be one of {HESS_APPROXES}, got {hess_approx!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not 0.0 < precision_floor < 1.0:
            raise ValueError(f"precision_floor must be in (0, 1), got {precision_floor!r}")
        defaults = dict(
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            clip_radius=clip_radius,
            rescale_lr=rescale_lr,
        )
        _check_hyperparameters(defaults, "")
        self.mc_samples = mc_samples
        self.hess_approx = hess_approx
        self.sync = sync
        self.precision_floor = precision_floor
        self._seed = int(torch.initial_seed()) if seed is None else seed
        self._user_generator = generator
        self._generators: dict[str, torch.Generator] = {}  # device -> owned noise generator
        self._saved_rank = 0  # rank whose generator state was loaded (for DDP resumes)
        self._blocks = 0  # train blocks accumulated since the last step
        self._in_block = False
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group, f"param group {len(self.param_groups) - 1}: ")
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"IVON needs floating-point parameters, got {p.dtype}")

    @staticmethod
    def _trainable(group: dict[str, Any]) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.requires_grad]

    def _state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The per-tensor state, created on first use: fp32 momentum and h, step 0."""
        st = self.state[p]
        if "hess" not in st:
            st["step"] = 0
            st["momentum"] = torch.zeros_like(p, dtype=torch.float32)
            st["hess"] = torch.full_like(p, group["hess_init"], dtype=torch.float32)
            if p.dtype != torch.float32:
                st["mean"] = p.detach().float().clone()  # fp32 master copy of the mean
        return st

    def _mean32(self, p: torch.Tensor, st: dict[str, Any]) -> torch.Tensor:
        """The fp32 mean: the master copy for low-precision params, else the param itself."""
        return st["mean"] if "mean" in st else p.detach()

    # ------------------------------------------------------------------------------ noise

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._user_generator is not None:
            return self._user_generator
        key = str(device)
        if key not in self._generators:
            rank = dist.get_rank() if _dist_active() else 0
            gen = torch.Generator(device=device)
            gen.manual_seed(_rank_seed(self._seed, rank))
            self._generators[key] = gen
        return self._generators[key]

    def _draw(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Standard normal noise for `params`: one flat fp32 draw per group, split per tensor."""
        total = sum(p.numel() for p in params)
        device = params[0].device
        eps = torch.randn(
            total, generator=self._generator(device), device=device, dtype=torch.float32
        )
        out, offset = [], 0
        for p in params:
            out.append(eps[offset : offset + p.numel()].view(p.shape).to(p.device))
            offset += p.numel()
        return out

    # --------------------------------------------------------------------------- sampling

    @contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Parameters hold one posterior sample `theta = m + s * eps` inside the block.

        train=True: the block's gradients (call `backward` inside) count towards the next
        `step()`. The mean is restored on exit, also when the body raises (that block then
        counts for nothing).
        """
        if self._in_block:
            raise RuntimeError("IVON.sampled_params blocks cannot be nested")
        self._in_block = True
        # One entry per trainable tensor: (param, state, saved fp32 mean or None, delta, grad)
        entries: list[tuple[torch.Tensor, dict, torch.Tensor | None, torch.Tensor, Any]] = []
        completed = False
        try:
            with torch.no_grad():
                for group in self.param_groups:
                    params = self._trainable(group)
                    if not params:
                        continue
                    noise = self._draw(group, params)
                    for p, eps in zip(params, noise, strict=True):
                        st = self._state(p, group)
                        if "mean" in st and not torch.equal(st["mean"].to(p.dtype), p):
                            st["mean"].copy_(p)  # the param was overwritten: follow it
                        saved = None if "mean" in st else p.detach().clone()
                        mean = st["mean"] if saved is None else saved
                        # delta = theta - m = s * eps, s = 1 / sqrt(ess * (h + wd)); same shape as p
                        delta = eps / (group["ess"] * (st["hess"] + group["weight_decay"])).sqrt()
                        set_aside = p.grad if train else None
                        entries.append((p, st, saved, delta, set_aside))
                        if train:
                            p.grad = None
                        p.copy_(mean + delta)
            yield
            if train:
                self._accumulate(entries)
            completed = True
        finally:
            with torch.no_grad():
                for p, st, saved, _, set_aside in entries:
                    p.copy_(saved if saved is not None else st["mean"])
                    if train:
                        block = p.grad if completed else None
                        if set_aside is not None and block is not None:
                            p.grad = set_aside.add_(block)
                        else:
                            p.grad = set_aside if block is None else block
            self._in_block = False

    @torch.no_grad()
    def _accumulate(self, entries: list[tuple]) -> None:
        """Add this block's g and (theta - m) * g (or g^2) to the fp32 per-tensor sums."""
        got_any = False
        for p, st, _, delta, _ in entries:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("IVON does not support sparse gradients")
            got_any = True
            g = p.grad.detach().float()
            if "grad_sum" not in st:
                st["grad_sum"] = torch.zeros_like(g)
                st["nxg_sum" if self.hess_approx == "price" else "gsq_sum"] = torch.zeros_like(g)
            st["grad_sum"].add_(g)
            if self.hess_approx == "price":
                st["nxg_sum"].add_(delta * g)
            else:
                st["gsq_sum"].add_(g * g)
        if got_any:
            self._blocks += 1

    # ------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update momentum, h and the mean from the blocks since the last step.

        With a closure (which computes the loss and calls backward), runs `mc_samples` sampled
        blocks first and returns their mean loss.
        """
        if self._in_block:
            raise RuntimeError("IVON.step() called inside a sampled_params block")
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / len(losses)
        aux_key = "nxg_sum" if self.hess_approx == "price" else "gsq_sum"
        entries = [(group, p) for group in self.param_groups for p in self._trainable(group)]
        blocks = self._blocks
        has = [("grad_sum" in self.state[p]) if p in self.state else False for _, p in entries]
        syncing = self.sync and _dist_active() and dist.get_world_size() > 1
        if syncing:
            has, blocks = self._sync_flags(entries, has, blocks)
        if blocks == 0:
            raise RuntimeError(
                "IVON.step() needs at least one `with opt.sampled_params(train=True):` block "
                "with a backward pass since the last step (or pass a closure)"
            )
        # Averages over this rank's blocks; a tensor without gradient in some blocks gets zeros there.
        stats: list[tuple[dict, torch.Tensor, dict, torch.Tensor, torch.Tensor]] = []
        for (group, p), flag in zip(entries, has, strict=True):
            if not flag:
                continue
            st = self._state(p, group)
            if "grad_sum" in st:
                g, aux = st["grad_sum"] / self._blocks, st[aux_key] / self._blocks
            else:  # another rank saw a gradient for it, this one did not
                g = torch.zeros_like(p, dtype=torch.float32)
                aux = torch.zeros_like(g)
            stats.append((group, p, st, g, aux))
        if syncing:
            self._all_reduce_mean(stats)
        for group, p, st, g, aux in stats:
            self._update(group, p, st, g, aux)
        for _, p in entries:
            if p in self.state:
                for key in _ACCUMULATORS:
                    self.state[p].pop(key, None)
        self._blocks = 0
        return loss

    def _sync_flags(self, entries: list, has: list[bool], blocks: int) -> tuple[list[bool], int]:
        """Which tensors got a gradient on any rank, and the fewest blocks on any rank."""
        device = entries[0][1].device if entries else torch.device("cpu")
        flags = torch.tensor([-float(blocks)] + [float(h) for h in has], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # [-min blocks, any-rank flags...]
        return [bool(v) for v in flags[1:].tolist()], int(-flags[0].item())

    def _all_reduce_mean(self, stats: list) -> None:
        """Mean over ranks of every tensor's averaged g and aux statistic, in one all-reduce."""
        if not stats:
            return
        flat = torch.cat([t.flatten() for *_, g, aux in stats for t in (g, aux)])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for *_, g, aux in stats:
            for t in (g, aux):
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def _update(
        self,
        group: dict[str, Any],
        p: torch.Tensor,
        st: dict[str, Any],
        g: torch.Tensor,
        aux: torch.Tensor,
    ) -> None:
        """Steps 2-5 of the module docstring for one tensor; all fp32, same shape as p."""
        b1, b2 = group["beta1"], group["beta2"]
        ess, wd, hess_init = group["ess"], group["weight_decay"], group["hess_init"]
        st["step"] += 1
        mom, h = st["momentum"], st["hess"]
        mom.mul_(b1).add_(g, alpha=1.0 - b1)
        # Hessian estimate of this step: aux is mean((theta - m) * g) or mean(g^2)
        h_hat = aux * (h + wd) * ess if self.hess_approx == "price" else aux * ess
        h_new = (
            b2 * h + (1.0 - b2) * h_hat + 0.5 * (1.0 - b2) ** 2 * (h - h_hat).square() / (h + wd)
        )
        h.copy_(h_new.clamp_(min=self.precision_floor * (hess_init + wd) - wd))
        mean = self._mean32(p, st)
        debias = 1.0 - b1 ** st["step"]
        direction = ((mom / debias + wd * mean) / (h + wd)).clamp_(
            -group["clip_radius"], group["clip_radius"]
        )
        lr = group["lr"] * (hess_init + wd) if group["rescale_lr"] else group["lr"]
        mean.sub_(lr * direction)
        if "mean" in st:
            p.copy_(mean)  # cast the fp32 master into the low-precision param

    # ---------------------------------------------------------------------------- export

    def _find(self, param: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is param for q in group["params"]):
                return group
        raise KeyError("this tensor is not a parameter of the optimizer")

    @torch.no_grad()
    def posterior_std(self, param: torch.Tensor) -> torch.Tensor:
        """s = 1 / sqrt(ess * (h + wd)) for `param`, fp32, its shape (h0 before any update)."""
        group = self._find(param)
        st = self.state.get(param, {})
        hess = (
            st["hess"]
            if "hess" in st
            else torch.full_like(param, group["hess_init"], dtype=torch.float32)
        )
        return (group["ess"] * (hess + group["weight_decay"])).rsqrt()

    @torch.no_grad()
    def posterior_mean(self, param: torch.Tensor) -> torch.Tensor:
        """The posterior mean of `param` in fp32 (the master copy for low-precision params)."""
        self._find(param)
        st = self.state.get(param, {})
        return (st["mean"] if "mean" in st else param.detach().float()).clone()

    def _named(
        self, names: Mapping[torch.Tensor, str] | Iterable[tuple[str, torch.Tensor]] | None
    ) -> list[tuple[str, torch.Tensor]]:
        """(name, param) for every trainable tensor, from `names` or the groups' param_names."""
        if names is None:
            out = []
            for i, group in enumerate(self.param_groups):
                if "param_names" not in group:
                    raise ValueError(
                        f"param group {i} has no names: build IVON from named_parameters() or "
                        "pass names={param: name}"
                    )
                out += [
                    (n, p)
                    for n, p in zip(group["param_names"], group["params"], strict=True)
                    if p.requires_grad
                ]
            return out
        by_id = (
            {id(p): n for p, n in names.items()}
            if isinstance(names, Mapping)
            else {id(p): n for n, p in names}
        )
        out = []
        for group in self.param_groups:
            for p in self._trainable(group):
                if id(p) not in by_id:
                    raise ValueError(f"no name given for a parameter of shape {tuple(p.shape)}")
                out.append((by_id[id(p)], p))
        return out

    def posterior_stds(
        self, names: Mapping[torch.Tensor, str] | Iterable[tuple[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """{name: fp32 std} of every trainable parameter.

        Names come from `names` (a `{param: name}` map or `(name, param)` pairs such as
        `model.named_parameters()`; extra entries are ignored) or, when None, from the groups'
        `param_names` (optimizer built from named parameters).
        """
        return {n: self.posterior_std(p) for n, p in self._named(names)}

    def posterior_means(
        self, names: Mapping[torch.Tensor, str] | Iterable[tuple[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """{name: fp32 mean} of every trainable parameter; names as in `posterior_stds`."""
        return {n: self.posterior_mean(p) for n, p in self._named(names)}

    @torch.no_grad()
    def hessian_stats(self) -> dict[str, float]:
        """Summary of h (and s) over all trainable entries, for logs.

        Keys: numel; h_min, h_median, h_max, h_mean; rel_change_median (median of h/h0 - 1);
        frac_changed (|h/h0 - 1| > 1%); frac_at_floor (held by the precision floor);
        std_min, std_median, std_max.
        """
        hs, ratios, floors, stds = [], [], [], []
        for group in self.param_groups:
            h0, wd = group["hess_init"], group["weight_decay"]
            for p in self._trainable(group):
                st = self.state.get(p, {})
                h = (
                    st["hess"] if "hess" in st else torch.full_like(p, h0, dtype=torch.float32)
                ).flatten()
                hs.append(h)
                ratios.append(h / h0 - 1.0)
                floors.append(h <= self.precision_floor * (h0 + wd) - wd)
                stds.append((group["ess"] * (h + wd)).rsqrt())
        if not hs:
            return {"numel": 0}
        h, r, f, s = (torch.cat(x).cpu() for x in (hs, ratios, floors, stds))
        return {
            "numel": h.numel(),
            "h_min": h.min().item(),
            "h_median": h.median().item(),
            "h_max": h.max().item(),
            "h_mean": h.mean().item(),
            "rel_change_median": r.median().item(),
            "frac_changed": (r.abs() > 0.01).float().mean().item(),
            "frac_at_floor": f.float().mean().item(),
            "std_min": s.min().item(),
            "std_median": s.median().item(),
            "std_max": s.max().item(),
        }

    # ------------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus "ivon": seed, pending block count, generator states."""
        sd = super().state_dict()
        gens = (
            {"user": self._user_generator.get_state()}
            if self._user_generator is not None
            else {k: g.get_state() for k, g in self._generators.items()}
        )
        sd["ivon"] = {
            "seed": self._seed,
            "blocks": self._blocks,
            "generators": gens,
            "rank": dist.get_rank() if _dist_active() else 0,
            "hess_approx": self.hess_approx,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()`; fp32 state stays fp32 (torch would cast it to the param dtype)."""
        if self._in_block:
            raise RuntimeError("cannot load a state dict inside a sampled_params block")
        extra = state_dict.get("ivon")
        if extra is not None and extra["hess_approx"] != self.hess_approx:
            raise ValueError(
                f"state dict was saved with hess_approx={extra['hess_approx']!r}, "
                f"this optimizer uses {self.hess_approx!r}"
            )
        super().load_state_dict(state_dict)
        # torch's loader casts floating state to the param dtype: put the saved fp32 back, copied.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if key in _FP32_STATE:
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32).clone()
        if extra is None:
            return
        self._seed, self._blocks = int(extra["seed"]), int(extra["blocks"])
        self._saved_rank = int(extra["rank"])
        rank = dist.get_rank() if _dist_active() else 0
        self._generators = {}
        gens = extra["generators"]
        if self._user_generator is not None:
            if "user" in gens:
                self._user_generator.set_state(gens["user"])
            return
        if rank != self._saved_rank or "user" in gens:
            # Another rank's (or a user generator's) stream: derive a fresh one for this rank.
            steps = max((int(st.get("step", 0)) for st in self.state.values()), default=0)
            for key in {str(p.device) for p in params}:
                gen = torch.Generator(device=key)
                gen.manual_seed(_rank_seed(self._seed, rank, salt=steps + 1))
                self._generators[key] = gen
            return
        for key, gstate in gens.items():
            gen = torch.Generator(device=key)
            gen.set_state(gstate)
            self._generators[key] = gen


def _check_hyperparameters(h: dict[str, Any], where: str) -> None:
    """Raise ValueError with a clear message for any out-of-range hyperparameter."""

    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"{where}{name} must be {rule}, got {h[name]!r}")

    if not (isinstance(h["lr"], int | float) and h["lr"] >= 0 and math.isfinite(h["lr"])):
        raise bad("lr", "a finite number >= 0")
    if not (isinstance(h["ess"], int | float) and h["ess"] > 0 and math.isfinite(h["ess"])):
        raise bad("ess", "a finite number > 0")
    if not (isinstance(h["hess_init"], int | float) and 0 < h["hess_init"] < math.inf):
        raise bad("hess_init", "a finite number > 0")
    if not (isinstance(h["beta1"], int | float) and 0 <= h["beta1"] < 1):
        raise bad("beta1", "in [0, 1)")
    if not (isinstance(h["beta2"], int | float) and 0 <= h["beta2"] <= 1):
        raise bad("beta2", "in [0, 1]")
    if not (isinstance(h["weight_decay"], int | float) and 0 <= h["weight_decay"] < math.inf):
        raise bad("weight_decay", "a finite number >= 0")
    if not (isinstance(h["clip_radius"], int | float) and h["clip_radius"] > 0):
        raise bad("clip_radius", "> 0 (inf for no clipping)")
    if not isinstance(h["rescale_lr"], bool):
        raise bad("rescale_lr", "a bool")
