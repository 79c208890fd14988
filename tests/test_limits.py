"""The request bounds: their messages, and defaults that admit every benchmark prompt with margin."""

from __future__ import annotations

import numpy as np
import pytest

from app.errors import LimitExceeded
from app.limits import DEFAULT_TEXT_TOKENS, RequestLimits
from app.settings import Settings


def limits(**kw) -> RequestLimits:
    return RequestLimits.for_model(Settings(**kw), context_window=1024, max_audio_tokens=150)


def test_messages_name_the_bound_its_setting_and_the_value():
    lim = limits(max_question_chars=10, max_choices=3)
    with pytest.raises(LimitExceeded) as e:
        lim.check_question("x" * 11)
    assert (e.value.limit, e.value.value, e.value.bound) == ("question_chars", 11, 10)
    assert str(e.value) == (
        "question has 11 characters; the limit is 10 (QUAVER_MAX_QUESTION_CHARS)"
    )
    with pytest.raises(LimitExceeded) as e:
        lim.check_choices(["a", "b", "c", "d"])
    assert str(e.value) == "4 choices; the limit is 3 (QUAVER_MAX_CHOICES)"
    assert e.value.body()["error"] == {
        "type": "limit_exceeded",
        "message": str(e.value),
        "limit": "choices",
        "value": 4,
        "bound": 3,
    }
    lim.check_question("x" * 10)  # at the bound: admitted
    lim.check_choices(["a", "b", "c"])


def test_prompt_bound_is_derived_from_the_model_unless_set():
    assert limits().max_prompt_tokens == 150 + 2 + DEFAULT_TEXT_TOKENS
    small = RequestLimits.for_model(Settings(), context_window=300, max_audio_tokens=150)
    assert small.max_prompt_tokens == 300  # never past the context window
    assert limits(max_prompt_tokens=400).max_prompt_tokens == 400
    with pytest.raises(ValueError, match="exceeds the model's context window"):
        limits(max_prompt_tokens=2000)


@pytest.mark.slow
def test_default_bounds_admit_every_benchmark_prompt_with_margin(assembled_base):
    """The defaults are derived from the benchmark: on the embedded default's tokenizer, its
    longest question, choice and whole prompt (10 s of audio) stay far inside them."""
    from app.modeling import load_checkpoint
    from app.predict import Predictor
    from training.data.generate import SPLITS, BenchmarkConfig, generate_item

    loaded = load_checkpoint(assembled_base)
    cfg, fam = loaded.model.config, loaded.family
    lim = RequestLimits.for_model(
        Settings(), fam.context_window(cfg), fam.audio_tokens_for_frames(fam.window_frames(cfg))
    )
    predictor = Predictor(loaded)
    bench = BenchmarkConfig(seed=0)
    longest = {"question": 0, "choice": 0, "prompt": 0}
    for split in SPLITS:
        for i in range(45):  # every family several times over
            item = generate_item(bench, split, i).item
            lim.check_question(item.question)
            lim.check_choices(list(item.choices))
            lim.check_tokens(loaded.tokenizer, item.question, list(item.choices))
            wave = np.zeros(int(loaded.features.max_seconds * 16000), np.float32)  # longest clip
            prepared = predictor.prepare(wave, item.question, item.choices)
            lim.check_prompt(len(prepared.prompt.ids))
            enc = loaded.tokenizer.encode
            longest["question"] = max(longest["question"], len(enc(item.question)))
            longest["choice"] = max(longest["choice"], *(len(enc(c)) for c in item.choices))
            longest["prompt"] = max(longest["prompt"], len(prepared.prompt.ids))
    s = Settings()
    assert longest["question"] * 8 <= s.max_question_tokens
    assert longest["choice"] * 8 <= s.max_choice_tokens
    assert longest["question"] * 50 <= s.max_question_chars
    text = longest["prompt"] - fam.audio_tokens_for_frames(fam.window_frames(cfg)) - 2
    assert text * 4 <= DEFAULT_TEXT_TOKENS
    print(f"longest benchmark question/choice/prompt (tokens): {longest}")
