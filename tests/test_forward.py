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
