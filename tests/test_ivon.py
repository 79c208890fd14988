"""Tests of training.ivon.IVON: oracle against the reference package, fp32 state, safety, resume, DDP.

    python -m pytest tests/test_ivon.py -q

The oracle tests compare with `ivon.IVON` from the dev extra ivon-opt (skipped without it). That
package draws its noise from torch's global generator, one flat draw per param group per sample;
ours draws the same layout from its own generator, so seeding both alike gives the same noise.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.ivon import IVON


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(
        dtype
    )


def _data(seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)  # (n, 3)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=gen)  # (n, 1)
    return x, y


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)


def _groups(model: torch.nn.Module, lr: float) -> list[dict]:
    # two groups with different lr and hess_init, to check per-group handling and noise layout
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return [{"params": first}, {"params": second, "lr": lr * 0.5, "hess_init": 0.3}]


def _train(opt, model, x, y, steps: int, mc: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        xb, yb = x[(t * 8) % 32 :][:8], y[(t * 8) % 32 :][:8]
        for _ in range(mc):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                _loss(model, xb, yb).backward()
        opt.step()


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-6) -> None:
    """Equal up to float rounding: max error <= rel * max |ref| (averaging order differs)."""
    err = (ours.detach() - ref.detach()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


ORACLE_CASES = [
    # rescale_lr on, reference defaults for wd and clip, beta2 low enough that h moves
    dict(
        lr=0.05,
        ess=50.0,
        hess_init=0.5,
        beta1=0.9,
        beta2=0.99,
        weight_decay=1e-4,
        clip_radius=float("inf"),
        rescale_lr=True,
        mc=1,
        hess_approx="price",
    ),
    # rescale off (LoRA recipes), weight decay, an active clip radius, 2 MC samples
    dict(
        lr=0.03,
        ess=200.0,
        hess_init=0.1,
        beta1=0.9,
        beta2=0.95,
        weight_decay=1e-2,
        clip_radius=1e-2,
        rescale_lr=False,
        mc=2,
        hess_approx="price",
    ),
    # squared-gradient Hessian estimate, other momentum
    dict(
        lr=0.1,
        ess=100.0,
        hess_init=1.0,
        beta1=0.5,
        beta2=0.999,
        weight_decay=1e-3,
        clip_radius=float("inf"),
        rescale_lr=True,
        mc=1,
        hess_approx="gradsq",
    ),
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=["rescale", "norescale-clip-mc2", "gradsq"])
def test_matches_reference_implementation(case):
    ref_ivon = pytest.importorskip("ivon", reason="ivon-opt (dev extra) is not installed")
    x, y = _data()
    kw = {
        k: case[k]
        for k in (
            "ess",
            "hess_init",
            "beta1",
            "beta2",
            "weight_decay",
            "clip_radius",
            "rescale_lr",
            "hess_approx",
        )
    }
    ref_model, our_model = _mlp(), _mlp()
    init = [p.detach().clone() for p in our_model.parameters()]
    ref = ref_ivon.IVON(_groups(ref_model, case["lr"]), lr=case["lr"], mc_samples=case["mc"], **kw)
    ours = IVON(
        _groups(our_model, case["lr"]), lr=case["lr"], mc_samples=case["mc"], seed=1234, **kw
    )
    torch.manual_seed(1234)  # the reference draws from the global generator
    _train(ref, ref_model, x, y, steps=12, mc=case["mc"])
    _train(ours, our_model, x, y, steps=11, mc=case["mc"])
    before = [p.detach().clone() for p in our_model.parameters()]
    _train(ours, our_model, x, y, steps=1, mc=case["mc"], start=11)
    if case["clip_radius"] < math.inf:  # the clip radius was reached in the last step
        biggest = max(
            (p - b).abs().max().item()
            for p, b in zip(our_model[0].parameters(), before, strict=False)
        )
        assert biggest == pytest.approx(case["lr"] * case["clip_radius"], rel=1e-4)
    for p_ref, p_our, p0 in zip(ref_model.parameters(), our_model.parameters(), init, strict=True):
        assert not torch.equal(p_our, p0)  # the mean moved
        _close(p_our, p_ref)
    for g_ref, g_our in zip(ref.param_groups, ours.param_groups, strict=True):
        h_our = torch.cat([ours.state[p]["hess"].flatten() for p in g_our["params"]])
        _close(h_our, g_ref["hess"])
        mom = torch.cat([ours.state[p]["momentum"].flatten() for p in g_our["params"]])
        _close(mom, g_ref["momentum"])
        rel = (h_our / g_our["hess_init"] - 1).abs()
        assert rel.max() > 0.01  # h actually learned something in 12 steps


def test_arguments_are_validated():
    p = [torch.nn.Parameter(torch.zeros(3))]
    good = dict(lr=0.1, ess=10.0, hess_init=0.1)
    for bad, msg in [
        ({"lr": -1.0}, "lr"),
        ({"ess": 0.0}, "ess"),
        ({"hess_init": 0.0}, "hess_init"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": 1.5}, "beta2"),
        ({"weight_decay": -1.0}, "weight"),
        ({"clip_radius": 0.0}, "clip_radius"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"hess_approx": "adam"}, "hess_approx"),
        ({"seed": 1, "generator": torch.Generator()}, "seed or generator"),
        ({"rescale_lr": "yes"}, "rescale_lr"),
        ({"precision_floor": 0.0}, "precision_floor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            IVON(p, **{**good, **bad})
    with pytest.raises(ValueError, match="param group 1: ess"):
        IVON([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(2))], "ess": -1.0}], **good)
    with pytest.raises(ValueError, match="floating-point"):
        IVON([torch.zeros(2, dtype=torch.long)], **good)


def test_fp32_state_and_master_with_bf16_params():
    model = _mlp(dtype=torch.bfloat16)
    x, y = _data()
    opt = IVON(
        model.parameters(), lr=1e-4, ess=1e6, hess_init=1.0, seed=0, rescale_lr=False, beta2=0.9
    )
    start = [p.detach().clone() for p in model.parameters()]
    seen_noise = []
    for _ in range(3):
        with opt.sampled_params(train=True):
            w = model[0].weight
            master = opt.state[w]["mean"]
            # the sample is drawn in fp32 around the fp32 master, then cast: std 1e-3 is visible
            seen_noise.append((w.float() - master).abs().max().item())
            _loss(model, x, y).backward()
        opt.step()
    assert min(seen_noise) > 1e-4
    for p, p0 in zip(model.parameters(), start, strict=True):
        st = opt.state[p]
        assert p.dtype == torch.bfloat16
        for key in ("momentum", "hess", "mean"):
            assert st[key].dtype == torch.float32, key
        assert torch.equal(p, st["mean"].to(torch.bfloat16))  # param holds the master's cast
        # steps of ~1e-4 accumulate in the fp32 master although bf16 cannot show most of them
        assert (st["mean"] - p0.float()).abs().max() > 0
    assert all(
        v.dtype == torch.float32
        for v in opt.posterior_stds(dict((p, n) for n, p in model.named_parameters())).values()
    )
    # writing into a param from outside: the master follows at the next block
    with torch.no_grad():
        model[2].bias.fill_(0.5)
    with opt.sampled_params():
        pass
    assert opt.state[model[2].bias]["mean"].item() == 0.5
    assert opt.posterior_mean(model[2].bias).item() == 0.5


def test_mean_restored_when_the_block_raises():
    model = _mlp()
    x, y = _data()
    opt = IVON(model.parameters(), lr=0.1, ess=10.0, hess_init=1.0, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    w = model[0].weight
    w.grad = torch.ones_like(w)  # an earlier gradient must survive too
    with pytest.raises(ZeroDivisionError), opt.sampled_params(train=True):
        assert not torch.equal(w, before[0])  # sampled weights are in place
        _loss(model, x, y).backward()
        raise ZeroDivisionError
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)
    assert torch.equal(w.grad, torch.ones_like(w))  # the failed block's gradient is dropped
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()  # the failed block does not count
    with opt.sampled_params(), pytest.raises(RuntimeError, match="nested"), opt.sampled_params():
        pass
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)


def test_step_without_blocks_raises_and_closure_runs_blocks():
    model = _mlp()
    x, y = _data()
    opt = IVON(model.parameters(), lr=0.1, ess=10.0, hess_init=1.0, seed=0, mc_samples=3)
    with pytest.raises(RuntimeError, match="at least one"):
        opt.step()
    with opt.sampled_params(train=True):  # no backward: ignored
        pass
    with pytest.raises(RuntimeError, match="at least one"):
        opt.step()
    calls = []

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        calls.append(loss.item())
        return loss

    loss = opt.step(closure)
    assert len(calls) == 3 and loss.item() == pytest.approx(sum(calls) / 3, rel=1e-6)
    assert opt.state[model[0].weight]["step"] == 1


def _manual_ivon_step(m, h, mom, grads, deltas, *, lr, ess, h0, b1, b2, wd, t):
    """The equations of one IVON step for one tensor, written out independently."""
    g = sum(grads) / len(grads)
    nxg = sum(d * gr for d, gr in zip(deltas, grads, strict=True)) / len(grads)
    mom = b1 * mom + (1 - b1) * g
    h_hat = ess * (h + wd) * nxg
    h = b2 * h + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h - h_hat) ** 2 / (h + wd)
    m = m - lr * (h0 + wd) * ((mom / (1 - b1**t) + wd * m) / (h + wd))
    return m, h, mom


def test_gradient_accumulation_averages_blocks():
    x, y = _data()
    hp = dict(lr=0.05, ess=30.0, hess_init=0.5, beta1=0.9, beta2=0.9, weight_decay=1e-3)
    results = {}
    for pattern in ("zero_inside", "zero_once"):
        model = _mlp()
        opt = IVON(model.parameters(), seed=7, **hp)
        m0 = [p.detach().clone() for p in model.parameters()]
        grads, deltas = [[] for _ in m0], [[] for _ in m0]
        opt.zero_grad()
        for k in range(2):  # two micro-batches, each with its own noise
            with opt.sampled_params(train=True):
                if pattern == "zero_inside":
                    opt.zero_grad()
                _loss(model, x[k * 16 : (k + 1) * 16], y[k * 16 : (k + 1) * 16]).backward()
                for i, p in enumerate(model.parameters()):
                    deltas[i].append(p.detach() - m0[i])
                    grads[i].append(p.grad.clone())
        if pattern == "zero_once":  # .grad holds the sum of both blocks, as torch accumulates
            for i, p in enumerate(model.parameters()):
                torch.testing.assert_close(p.grad, grads[i][0] + grads[i][1])
        opt.step()
        for i, p in enumerate(model.parameters()):
            m, h, mom = _manual_ivon_step(
                m0[i],
                torch.full_like(p, 0.5),
                torch.zeros_like(p),
                grads[i],
                deltas[i],
                lr=0.05,
                ess=30.0,
                h0=0.5,
                b1=0.9,
                b2=0.9,
                wd=1e-3,
                t=1,
            )
            torch.testing.assert_close(p.detach(), m, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(opt.state[p]["hess"], h, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(opt.state[p]["momentum"], mom, rtol=1e-5, atol=1e-8)
        results[pattern] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(results["zero_inside"], results["zero_once"], strict=True):
        assert torch.equal(a, b)


def test_param_without_gradient_is_skipped():
    model = _mlp()
    unused = torch.nn.Parameter(torch.randn(4))
    x, y = _data()
    opt = IVON([*model.parameters(), unused], lr=0.1, ess=10.0, hess_init=1.0, seed=0)
    before = unused.detach().clone()
    for _ in range(2):
        with opt.sampled_params(train=True):
            _loss(model, x, y).backward()
        opt.step()
    assert torch.equal(unused, before)
    assert opt.state[unused]["step"] == 0
    assert torch.equal(opt.state[unused]["hess"], torch.ones(4))
    assert torch.equal(opt.state[unused]["momentum"], torch.zeros(4))
    # a train block in which none of the optimizer's params got a gradient is ignored
    opt2 = IVON([unused], lr=0.1, ess=10.0, hess_init=1.0, beta1=0.9, seed=0)
    with opt2.sampled_params(train=True):
        (unused * 2.0).sum().backward()
    with opt2.sampled_params(train=True):
        _loss(model, x, y).backward()  # gradients for other tensors only
    assert opt2._blocks == 1
    opt2.step()
    torch.testing.assert_close(opt2.state[unused]["momentum"], torch.full((4,), 0.2))


def test_partial_gradients_count_as_zero():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = IVON([a, b], lr=0.1, ess=10.0, hess_init=1.0, beta1=0.9, seed=0)
    with opt.sampled_params(train=True):
        (a * 2.0 + b).sum().backward()
    with opt.sampled_params(train=True):
        b.sum().backward()
    opt.step()
    torch.testing.assert_close(opt.state[a]["momentum"], torch.full((2,), 0.1))  # 0.1 * 2 / 2
    torch.testing.assert_close(opt.state[b]["momentum"], torch.full((2,), 0.1))  # 0.1 * 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(dtype):
    x, y = _data()
    model = _mlp(dtype=dtype)
    opt = IVON(model.parameters(), lr=0.05, ess=30.0, hess_init=0.5, beta2=0.9, seed=3)
    _train(opt, model, x, y, steps=3, mc=2)
    buf = io.BytesIO()
    torch.save(
        {"opt": opt.state_dict(), "params": [p.detach().clone() for p in model.parameters()]}, buf
    )
    _train(opt, model, x, y, steps=3, mc=2)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _mlp(seed=99, dtype=dtype)
    with torch.no_grad():
        for p, s in zip(model2.parameters(), saved["params"], strict=True):
            p.copy_(s)
    opt2 = IVON(model2.parameters(), lr=0.05, ess=30.0, hess_init=0.5, beta2=0.9, seed=777)
    opt2.load_state_dict(saved["opt"])
    assert all(opt2.state[p]["step"] == 3 for p in model2.parameters())  # bias correction
    _train(opt2, model2, x, y, steps=3, mc=2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("hess", "momentum") + (("mean",) if dtype != torch.float32 else ()):
            assert opt2.state[q][key].dtype == torch.float32
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key


def test_state_dict_keeps_pending_blocks():
    x, y = _data()
    model, model2 = _mlp(), _mlp()
    opt = IVON(model.parameters(), lr=0.05, ess=30.0, hess_init=0.5, seed=3)
    opt2 = IVON(model2.parameters(), lr=0.05, ess=30.0, hess_init=0.5, seed=5)
    with opt.sampled_params(train=True):
        _loss(model, x, y).backward()
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, m in ((opt, model), (opt2, model2)):
        with o.sampled_params(train=True):
            o.zero_grad()
            _loss(m, x, y).backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sampled_weights_have_the_posterior_std():
    x, y = _data()
    model = _mlp()
    opt = IVON(model.parameters(), lr=0.05, ess=20.0, hess_init=0.5, beta2=0.8, seed=11)
    _train(opt, model, x, y, steps=8, mc=1)
    w = model[0].weight
    s = opt.posterior_std(w)
    assert s.dtype == torch.float32 and s.shape == w.shape
    assert (s.max() / s.min()) > 1.2  # h differs between entries: a real per-entry check
    draws = []
    for _ in range(4000):
        with opt.sampled_params():
            draws.append(w.detach().clone())
    empirical = torch.stack(draws).std(0)
    assert ((empirical / s) - 1).abs().max() < 0.05
    mean_err = (torch.stack(draws).mean(0) - w.detach()).abs() / s
    assert mean_err.max() < 0.1  # 4000 draws: standard error of the mean is s / 63


def test_named_export_and_hessian_stats():
    model = _mlp()
    x, y = _data()
    opt = IVON(model.named_parameters(), lr=0.05, ess=20.0, hess_init=0.5, beta2=0.9, seed=0)
    stats0 = opt.hessian_stats()
    assert stats0["frac_changed"] == 0.0 and stats0["h_median"] == pytest.approx(0.5)
    assert stats0["std_median"] == pytest.approx(1 / math.sqrt(20.0 * (0.5 + 1e-4)), rel=1e-6)
    _train(opt, model, x, y, steps=5, mc=1)
    stds = opt.posterior_stds()
    assert set(stds) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(stds[n], opt.posterior_std(p))
        torch.testing.assert_close(opt.posterior_means()[n], p.detach())
    stats = opt.hessian_stats()
    assert stats["numel"] == sum(p.numel() for p in model.parameters())
    assert stats["h_min"] <= stats["h_median"] <= stats["h_max"]
    assert stats["frac_changed"] > 0.5 and stats["frac_at_floor"] == 0.0
    unnamed = IVON(model.parameters(), lr=0.05, ess=20.0)
    with pytest.raises(ValueError, match="names"):
        unnamed.posterior_stds()
    assert set(unnamed.posterior_stds(model.named_parameters())) == set(stds)


def test_hessian_floor_keeps_precision_positive():
    # With beta2 = 0, wd = 0 and a zero gradient (h_hat = 0) each step halves h exactly:
    # 2^-14 < 1e-4 * hess_init, so after 20 steps every entry sits on the floor.
    p = torch.nn.Parameter(torch.zeros(50))
    opt = IVON([p], lr=0.0, ess=1.0, hess_init=1.0, beta2=0.0, weight_decay=0.0, seed=0)
    for t in range(20):
        with opt.sampled_params(train=True):
            (p * 0.0).sum().backward()
        opt.step()
        if t == 9:
            assert torch.equal(opt.state[p]["hess"], torch.full((50,), 2.0**-10))
    h = opt.state[p]["hess"]
    assert torch.equal(h, torch.full_like(h, 1e-4))
    stats = opt.hessian_stats()
    assert stats["frac_at_floor"] == 1.0 and stats["frac_changed"] == 1.0
    assert torch.isfinite(opt.posterior_std(p)).all()
    assert opt.posterior_std(p).max().item() == pytest.approx(100.0, rel=1e-4)


# ------------------------------------------------------------------------------------ DDP


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = _data(seed=10 + rank)  # each rank has its own data shard
        result = {}
        for sync in (True, False):
            model = _mlp()  # same init on every rank
            opt = IVON(
                model.parameters(), lr=0.05, ess=30.0, hess_init=0.5, beta2=0.9, seed=5, sync=sync
            )
            first = None
            for t in range(4):
                for k in range(2):  # two micro-batches, each its own noise draw
                    with opt.sampled_params(train=True):
                        if first is None:
                            first = model[0].weight.detach().clone()
                        _loss(model, x[k * 8 + t :][:8], y[k * 8 + t :][:8]).backward()
                opt.step()
                opt.zero_grad()
            result[sync] = {
                "m": [p.detach().clone() for p in model.parameters()],
                "h": [opt.state[p]["hess"].clone() for p in model.parameters()],
                "first_sample": first,
            }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_posteriors(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # fork (where available) spares each rank a fresh interpreter importing torch
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method=method,
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not torch.equal(r0[True]["first_sample"], r1[True]["first_sample"])  # own noise
    for a, b in zip(r0[True]["m"] + r0[True]["h"], r1[True]["m"] + r1[True]["h"], strict=True):
        assert torch.equal(a, b)
    # without sync the ranks drift apart (what sync exists for)
    assert any(not torch.equal(a, b) for a, b in zip(r0[False]["m"], r1[False]["m"], strict=True))
