"""The split forward pass equals the stock transformers forward, and rows are independent."""

import numpy as np
import torch

from app.forward import collate, letter_log_probs
from app.modeling import load_checkpoint
from tests.conftest import tone


def _prompts(loaded, lengths=(1.0, 3.5), n_choices=(3, 2)):
    feats = [loaded.features(tone(s, 300 + 100 * i)) for i, s in enumerate(lengths)]
    prompts = [
        loaded.prompts.build(
            loaded.family.audio_tokens_for_frames(f.n_frames),
            "How many beeps are there?",
            ["one", "two", "three"][:k],
        )
        for f, k in zip(feats, n_choices, strict=True)
    ]
    return feats, prompts


def test_matches_stock_forward(tiny_dir):
    loaded = load_checkpoint(tiny_dir)
    feats, prompts = _prompts(loaded)
    batch = collate(prompts, feats, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = letter_log_probs(loaded.model, batch, loaded.letter_ids)
        for i, (p, f) in enumerate(zip(prompts, feats, strict=True)):
            mask = (torch.arange(f.features.shape[1]) < f.n_frames).long()[None]
            out = loaded.model(
                input_ids=p.ids[None], input_features=f.features[None], feature_attention_mask=mask
            )
            ref = out.logits[0, -1, loaded.letter_ids][: p.n_choices].log_softmax(-1)
            torch.testing.assert_close(ours[i, : p.n_choices], ref, atol=1e-5, rtol=1e-5)
            assert torch.isinf(ours[i, p.n_choices :]).all()


def test_split_and_batching_do_not_change_results(tiny_dir):
    loaded = load_checkpoint(tiny_dir)
    feats, prompts = _prompts(loaded)
    pad = loaded.tokenizer.pad_token_id
    with torch.no_grad():
        full = letter_log_probs(loaded.model, collate(prompts, feats, pad), loaded.letter_ids)
        split = letter_log_probs(
            loaded.model, collate(prompts, feats, pad), loaded.letter_ids, split=2
        )
        alone = letter_log_probs(
            loaded.model, collate(prompts[1:], feats[1:], pad), loaded.letter_ids
        )
    finite = torch.isfinite(full)
    torch.testing.assert_close(full[finite], split[finite], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(full[1, :2].numpy(), alone[0, :2].numpy(), atol=1e-5)


def test_audio_window_is_cut_to_the_longest_clip(tiny_dir):
    """Short clips run the encoder on a cut window; their audio tokens equal the full window's."""
    from transformers.masking_utils import create_bidirectional_mask

    from app.forward import audio_hidden

    loaded = load_checkpoint(tiny_dir)
    feats, _ = _prompts(loaded, lengths=(1.0, 2.5))
    features = torch.stack([f.features for f in feats])  # (2, n_mels, full window)
    n_frames = torch.tensor([f.n_frames for f in feats])
    tower = loaded.family.audio_tower(loaded.model)
    conv_lens, out_lens = tower._get_feat_extract_output_lengths(n_frames)
    enc_len = features.shape[-1] // 2
    valid = (torch.arange(enc_len)[None] < conv_lens[:, None]).long()
    mask = create_bidirectional_mask(
        config=tower.config, inputs_embeds=torch.zeros(2, enc_len, 1), attention_mask=valid
    )
    with torch.no_grad():
        ref = tower(features, attention_mask=mask).last_hidden_state  # stock: full window only
        ours, lens = audio_hidden(loaded.model, features, n_frames)
    assert ours.shape[1] < ref.shape[1]  # the window was cut
    assert lens.tolist() == out_lens.tolist()
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(ours[i, :n], ref[i, :n], atol=1e-5, rtol=1e-5)


def test_last_layer_at_the_last_token_equals_the_whole_layer(tiny_dir):
    """The suffix runs its last layer for each row's last token only (app.forward.last_token_layer):
    the same letter logits and the same gradients as the whole layer, rows of unequal length."""
    import dataclasses

    from app.forward import prefix_hidden, suffix_letter_logits

    loaded = load_checkpoint(tiny_dir)
    model, family = loaded.model, loaded.family
    assert family.plain_decoder_layers
    whole = dataclasses.replace(family, plain_decoder_layers=False)
    feats, prompts = _prompts(loaded, lengths=(1.0, 3.5, 2.0), n_choices=(3, 2, 3))
    batch = collate(prompts, feats, loaded.tokenizer.pad_token_id)
    assert len(set(batch.lengths.tolist())) == 3  # padding differs per row
    split = loaded.num_layers - 2
    with torch.no_grad():
        h = prefix_hidden(model, batch, split, family)
    out = {}
    for name, fam in (("fast", family), ("whole", whole)):
        x = h.clone().requires_grad_()
        logits = suffix_letter_logits(model, x, batch.lengths, split, loaded.letter_ids, fam)
        (grad,) = torch.autograd.grad((logits * torch.linspace(-1, 1, logits.shape[1])).sum(), x)
        out[name] = logits.detach(), grad
    torch.testing.assert_close(out["fast"][0], out["whole"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["fast"][1], out["whole"][1], atol=1e-5, rtol=1e-5)
    assert out["fast"][1][0, int(batch.lengths[0]) :].abs().max() == 0  # padding gets nothing


def test_samples_on_every_row_equal_gathered_rows(tiny_dir):
    """`SampleSet.every_row` adds the deviations without gathering rows: the same probabilities
    as the gathered path, for a K-sample pass whose rows all carry a sample."""
    import dataclasses

    from app.lora import SampleSet
    from app.predict import Predictor, Request
    from tests.conftest import random_posterior

    loaded = load_checkpoint(tiny_dir)
    predictor = Predictor(loaded, random_posterior(loaded.model, base_hash=loaded.identity))
    prepared = [
        predictor.prepare(tone(s, 300 + 100 * i), "How many beeps are there?", ["one", "two"])
        for i, s in enumerate((1.0, 3.5))
    ]
    reqs = [Request(p, samples=3, seed=i) for i, p in enumerate(prepared)]
    draw = predictor._draw
    seen = []

    def gathered(requests, ks):
        samples = draw(requests, ks)
        seen.append(samples.every_row)
        return dataclasses.replace(samples, every_row=False)

    fast = predictor.predict(reqs)
    predictor._draw = gathered
    slow = predictor.predict(reqs)
    assert seen == [True]  # every row of this pass is a sample
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.sample_probs, b.sample_probs, atol=1e-6)
    assert isinstance(draw(reqs, [3, 3]), SampleSet)
    assert not draw([Request(prepared[0], samples=1), reqs[1]], [1, 3]).every_row  # mean row
