"""Posterior directory: round trip, validation errors, PEFT equivalence, sampling statistics."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from app.lora import PosteriorSampler
from app.modeling import load_checkpoint
from app.posterior import POSTERIOR_FILE, PosteriorError, load_posterior
from app.predict import Predictor, Request
from tests.conftest import tone


def test_round_trip(tiny_dir, posterior_dir):
    loaded = load_checkpoint(tiny_dir)
    post = load_posterior(posterior_dir, expected_base=loaded.identity, model=loaded.model)
    raw = load_file(posterior_dir / POSTERIOR_FILE)
    for key, t in post.mean.items():
        assert torch.equal(t, raw[f"{key}.mean"])
        assert torch.equal(post.std[key], raw[f"{key}.std"])
    assert post.spec.first_layer == 2 and post.calibration["targets"]


def _corrupt(src, dst, fn):
    shutil.copytree(src, dst)
    tensors = load_file(dst / POSTERIOR_FILE)
    fn(tensors)
    save_file(tensors, dst / POSTERIOR_FILE)
    return dst


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("missing", lambda t: t.pop(next(k for k in t if k.endswith(".std"))), "missing tensor"),
        ("nan", lambda t: t[next(iter(t))].view(-1).__setitem__(0, float("nan")), r"NaN"),
        (
            "shape",
            lambda t: t.__setitem__(
                next(k for k in t if "lora_A" in k and k.endswith(".mean")), torch.zeros(4, 3)
            ),
            "shape",
        ),
        ("dtype", lambda t: t.__setitem__(next(iter(t)), t[next(iter(t))].half()), "float32"),
    ],
)
def test_bad_posterior_is_refused(tiny_dir, posterior_dir, tmp_path, name, mutate, message):
    loaded = load_checkpoint(tiny_dir)
    bad = _corrupt(posterior_dir, tmp_path / name, mutate)
    with pytest.raises(PosteriorError, match=message):
        load_posterior(bad, expected_base=loaded.identity, model=loaded.model)


def test_other_base_and_missing_meta_are_refused(tiny_dir, posterior_dir, tmp_path):
    loaded = load_checkpoint(tiny_dir)
    with pytest.raises(PosteriorError, match="loaded base has identity 000000000000"):
        load_posterior(posterior_dir, expected_base="0" * 64, model=loaded.model)
    d = tmp_path / "nometa"
    shutil.copytree(posterior_dir, d)
    (d / "quaver.json").unlink()
    with pytest.raises(PosteriorError, match=r"missing quaver\.json"):
        load_posterior(d)
    meta = json.loads((posterior_dir / "quaver.json").read_text())
    meta["format_version"] = 99
    d2 = tmp_path / "version"
    shutil.copytree(posterior_dir, d2)
    (d2 / "quaver.json").write_text(json.dumps(meta))
    with pytest.raises(PosteriorError, match="format_version"):
        load_posterior(d2)
    with pytest.raises(PosteriorError, match="does not exist"):
        load_posterior(tmp_path / "nowhere")


def test_posterior_is_refused_on_a_base_with_other_weights_of_the_same_shape(
    tiny_dir, posterior_dir, tmp_path
):
    from tests.conftest import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=1)  # same config and tokenizer
    mine, theirs = load_checkpoint(tiny_dir), load_checkpoint(other)
    assert mine.config_hash == theirs.config_hash and mine.identity != theirs.identity
    with pytest.raises(PosteriorError) as err:
        Predictor.from_dirs(other, posterior_dir)
    message = str(err.value)
    assert f"identity {mine.identity[:12]}" in message  # the base it was trained on
    assert f"loaded base has identity {theirs.identity[:12]}" in message
    # a posterior that records no identity cannot be checked, so it is refused too
    d = tmp_path / "no-identity"
    shutil.copytree(posterior_dir, d)
    meta = json.loads((d / "quaver.json").read_text())
    del meta["base"]["identity"]
    (d / "quaver.json").write_text(json.dumps(meta))
    with pytest.raises(PosteriorError, match="records no base identity"):
        Predictor.from_dirs(tiny_dir, d)


def test_base_identity_is_stored_beside_and_covers_the_tokenizer(tiny_dir, tmp_path):
    from app.modeling import IDENTITY_FILE, base_identity

    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy_dir)
    first = base_identity(copy_dir)
    assert first == load_checkpoint(tiny_dir).identity  # the content, not the path
    stored = json.loads((copy_dir / IDENTITY_FILE).read_text())
    assert stored["identity"] == first
    # read back, not recomputed, while the files keep their stamps
    (copy_dir / IDENTITY_FILE).write_text(json.dumps({**stored, "identity": "cached"}))
    assert base_identity(copy_dir) == "cached"
    # a tokenizer edited in place (same shape of everything else) is another base
    tok = copy_dir / "tokenizer.json"
    data = json.loads(tok.read_text())
    data["model"]["vocab"] = {
        k + "x" if v == 50 else k: v for k, v in data["model"]["vocab"].items()
    }
    tok.write_text(json.dumps(data))
    assert base_identity(copy_dir) not in ("cached", first)


def test_base_identity_on_a_read_only_file_system(tiny_dir, tmp_path, monkeypatch):
    """A base in a read-only image (the container runs --read-only): computed, not stored."""
    import errno
    from pathlib import Path

    from app.modeling import IDENTITY_FILE, base_identity

    copy_dir = tmp_path / "ro"
    shutil.copytree(tiny_dir, copy_dir)
    (copy_dir / IDENTITY_FILE).unlink(missing_ok=True)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    assert base_identity(copy_dir) == load_checkpoint(tiny_dir).identity
    assert not (copy_dir / IDENTITY_FILE).exists()


def test_detach_gives_the_base_back_for_a_second_posterior(tiny_dir, posterior_dir, tmp_path):
    from app.modeling import load_checkpoint as load
    from app.posterior import save_posterior
    from tests.conftest import random_posterior

    loaded = load(tiny_dir)
    before = {k: t.clone() for k, t in loaded.model.state_dict().items()}
    first = Predictor(loaded, load_posterior(posterior_dir, model=loaded.model))
    target = first.posterior.spec.modules[0]
    merged = dict(loaded.model.named_modules())[target].weight
    assert not torch.equal(merged, before[f"{target}.weight"])  # the mean is merged in
    first.detach()
    after = loaded.model.state_dict()
    assert set(after) == set(before)
    for k, t in before.items():
        torch.testing.assert_close(after[k], t, atol=1e-6, rtol=1e-6)
    second_dir = save_posterior(
        tmp_path / "second",
        random_posterior(loaded.model, layers=(1, 3), seed=9, base_hash=loaded.identity),
    )
    second = Predictor(loaded, load_posterior(second_dir, model=loaded.model))
    fresh = Predictor.from_dirs(tiny_dir, second_dir)
    prep = _prepared(second)
    [a] = second.predict([Request(prep, samples=4, seed=3)])
    [b] = fresh.predict([Request(prep, samples=4, seed=3)])
    np.testing.assert_allclose(a.sample_probs, b.sample_probs, atol=1e-5)


def _prepared(predictor, seconds=2.0, freq=440.0, k=3):
    return predictor.prepare(
        tone(seconds, freq), "How many beeps are there?", ["one", "two", "three", "four"][:k]
    )


def test_mean_matches_stock_peft_adapter(tiny_dir, posterior_dir):
    from peft import PeftModel

    from app.forward import collate, letter_log_probs

    loaded = load_checkpoint(tiny_dir)
    post = load_posterior(posterior_dir, model=loaded.model)
    peft_base = copy.deepcopy(loaded.model)
    predictor = Predictor(loaded, post)
    prep = _prepared(predictor)
    [ours] = predictor.predict([Request(prep, samples=1)])
    peft_model = PeftModel.from_pretrained(peft_base, posterior_dir).eval()
    batch = collate([prep.prompt], [prep.audio], loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = letter_log_probs(peft_model.base_model.model, batch, loaded.letter_ids)[0, :3].exp()
    ref = torch.from_numpy(prep.prompt.to_user_order(ref.numpy()))  # letters -> user's order
    torch.testing.assert_close(torch.from_numpy(ours.probs), ref, atol=1e-5, rtol=1e-4)


def test_canonical_order_maps_letters_back():
    from app.prompt import PromptIds, canonical_order

    order = canonical_order(["b", " A  c", "a b"])  # sorted: "a b", "a c", "b"
    assert order == (2, 1, 0)
    p = PromptIds(torch.zeros(3, dtype=torch.long), 0, 3, order)
    assert [p.letter_of(i) for i in range(3)] == [2, 1, 0]
    letters = np.array([[0.5, 0.3, 0.2]])  # A, B, C
    np.testing.assert_array_equal(p.to_user_order(letters), [[0.2, 0.3, 0.5]])
    assert PromptIds(torch.zeros(1, dtype=torch.long), 0, 2).order == (0, 1)


def test_answer_does_not_depend_on_the_order_of_the_choices(tiny_dir, posterior_dir):
    # Choices are lettered in one canonical order: a permuted request gets the same prompt, and
    # its probabilities come back permuted, each still attached to its own choice.
    loaded = load_checkpoint(tiny_dir)
    predictor = Predictor(loaded, load_posterior(posterior_dir, model=loaded.model))
    choices = ["two", "Four", "one", "three"]
    perm = [2, 0, 3, 1]
    a = predictor.prepare(tone(2.0, 440.0), "How many beeps?", choices)
    b = predictor.prepare(tone(2.0, 440.0), "How many beeps?", [choices[i] for i in perm])
    assert torch.equal(a.prompt.ids, b.prompt.ids)
    assert a.prompt.order == (1, 2, 3, 0)  # Four, one, three, two (case-insensitive)
    pa, pb = predictor.predict([Request(a, samples=4, seed=3), Request(b, samples=4, seed=3)])
    np.testing.assert_allclose(pb.probs, pa.probs[perm], atol=1e-6)
    assert choices[pa.answer_index] == [choices[i] for i in perm][pb.answer_index]
    assert not np.allclose(pa.probs, pa.probs[perm])  # the check above can fail


def test_samples_have_the_exported_std(tiny_dir, posterior_dir):
    loaded = load_checkpoint(tiny_dir)
    post = load_posterior(posterior_dir, model=loaded.model)
    sampler = PosteriorSampler(post, torch.device("cpu"), torch.float32)
    factors = sampler.draw(4000, torch.Generator().manual_seed(0))
    r = post.spec.rank
    for module in post.spec.modules[:3]:
        a, b = factors[module]
        m_a, s_a = post.factor(module, "A")
        emp = a[:, :r].std(0)  # (r, in): the sampled A rows
        assert torch.allclose(a[:, r:], m_a.expand(len(a), -1, -1))
        ratio = emp / s_a
        assert ratio.mean().item() == pytest.approx(1.0, abs=0.05)
        _, s_b = post.factor(module, "B")
        emp_b = (b[:, :, :r] / post.spec.scale).std(0)
        assert (emp_b / s_b).mean().item() == pytest.approx(1.0, abs=0.05)


def test_sampled_rows_equal_explicit_weight_perturbation(tiny_dir, posterior_dir):
    """Row k of the batched pass == a plain model whose weights are W + s * B_k @ A_k."""
    from app.forward import collate, letter_log_probs

    loaded = load_checkpoint(tiny_dir)
    plain = copy.deepcopy(loaded.model)
    post = load_posterior(posterior_dir, model=loaded.model)
    predictor = Predictor(loaded, post)
    prep = _prepared(predictor)
    [pred] = predictor.predict([Request(prep, samples=3, seed=7)])
    factors = predictor.sampler.draw(3, torch.Generator().manual_seed(7))
    r = post.spec.rank
    batch = collate([prep.prompt], [prep.audio], loaded.tokenizer.pad_token_id)
    for k in range(3):
        model_k = copy.deepcopy(plain)
        mods = dict(model_k.named_modules())
        with torch.no_grad():
            for name in post.spec.modules:
                a, b = factors[name]
                a_k, b_k = a[k, :r], b[k, :, :r]  # scale already folded into b
                mods[name].weight += b_k @ a_k
            ref = letter_log_probs(model_k, batch, loaded.letter_ids)[0, :3].exp()
        ref = torch.from_numpy(prep.prompt.to_user_order(ref.numpy()))
        torch.testing.assert_close(
            torch.from_numpy(pred.sample_probs[k]), ref, atol=1e-5, rtol=1e-4
        )
    fresh = load_checkpoint(tiny_dir).model.state_dict()  # the copy is the un-merged base
    assert all(torch.equal(t, fresh[k]) for k, t in plain.state_dict().items())
    assert not torch.equal(
        torch.from_numpy(pred.sample_probs[0]), torch.from_numpy(pred.sample_probs[1])
    )


def test_batched_equals_unbatched_and_seeds(tiny_dir, posterior_dir):
    loaded = load_checkpoint(tiny_dir)
    predictor = Predictor(loaded, load_posterior(posterior_dir, model=loaded.model))
    p1, p2 = _prepared(predictor, 1.0, 300.0, 2), _prepared(predictor, 4.0, 900.0, 4)
    together = predictor.predict([Request(p1, 4, seed=1), Request(p2, 1), Request(p2, 8, seed=2)])
    alone = [
        predictor.predict([r])[0]
        for r in (Request(p1, 4, seed=1), Request(p2, 1), Request(p2, 8, seed=2))
    ]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(a.sample_probs), torch.from_numpy(b.sample_probs), atol=1e-5, rtol=1e-4
        )
    other = predictor.predict([Request(p1, 4, seed=2)])[0]
    assert not torch.allclose(
        torch.from_numpy(other.sample_probs), torch.from_numpy(alone[0].sample_probs)
    )
    assert alone[2].mutual_information >= 0 and 0 <= alone[2].agreement <= 1


def test_tensor_files_get_the_process_file_mode(tmp_path):
    """safetensors creates its files 0600; save_tensors gives them the mode any other file of
    the process gets (0666 minus the umask), so another user (the image's service user) can
    read a posterior exported by this one."""
    import os

    from app.posterior import save_tensors

    old = os.umask(0o022)
    try:
        path = save_tensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        strict = save_tensors({"a": torch.zeros(2)}, tmp_path / "y.safetensors")
        assert strict.stat().st_mode & 0o777 == 0o600  # a stricter umask is honoured
    finally:
        os.umask(old)
