"""Bounds on what one request may cost, checked before it reaches the engine.

    limits = RequestLimits.for_model(settings, loaded)        # once, at load
    limits.check_question(question); limits.check_choices(choices)   # characters, counts: cheap
    limits.check_tokens(tokenizer, question, choices)           # tokens, on bounded text
    limits.check_prompt(prompt_ids)                             # the whole prompt, audio included

A request's compute grows with its prompt length (attention is quadratic in it) times its K
samples, so every factor is bounded: characters first (so that tokenising is itself bounded),
then tokens per part, then the whole prompt. Audio duration and K are bounded elsewhere
(`app.audio`, the server's K check). A violation raises `LimitExceeded`, a 422 whose message
names the bound, its setting and the value that broke it.

Defaults (app/settings.py): the longest benchmark question is 18 tokens and its longest choice 3
(tests/test_limits.py measures it on every split), so 256 question tokens and 64 choice tokens
leave a wide margin for real questions; the whole prompt may hold the longest audio block plus
512 text tokens, never more than the model's context window.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import LimitExceeded

# Text tokens allowed beside the longest audio block when QUAVER_MAX_PROMPT_TOKENS is unset.
DEFAULT_TEXT_TOKENS = 512


@dataclass(frozen=True)
class RequestLimits:
    """The bounds one request must meet; each field mirrors a `QUAVER_*` setting."""

    max_question_chars: int
    """Question length in characters (QUAVER_MAX_QUESTION_CHARS)."""
    max_choice_chars: int
    """One choice's length in characters (QUAVER_MAX_CHOICE_CHARS)."""
    max_choices: int
    """Number of choices (QUAVER_MAX_CHOICES)."""
    max_question_tokens: int
    """Question length in tokens (QUAVER_MAX_QUESTION_TOKENS)."""
    max_choice_tokens: int
    """One choice's length in tokens (QUAVER_MAX_CHOICE_TOKENS)."""
    max_prompt_tokens: int
    """Whole prompt in tokens, audio block included (QUAVER_MAX_PROMPT_TOKENS)."""

    @classmethod
    def for_model(cls, settings, context_window: int, max_audio_tokens: int) -> RequestLimits:
        """The settings' bounds, with the prompt bound derived from the model when unset.

        `context_window`: the decoder's maximum positions; `max_audio_tokens`: audio tokens of
        the longest clip the model's window admits (plus its two boundary tokens)."""
        prompt = settings.max_prompt_tokens
        if prompt is None:
            prompt = min(context_window, max_audio_tokens + 2 + DEFAULT_TEXT_TOKENS)
        if prompt > context_window:
            raise ValueError(
                f"QUAVER_MAX_PROMPT_TOKENS={prompt} exceeds the model's context window "
                f"({context_window} tokens)"
            )
        return cls(
            max_question_chars=settings.max_question_chars,
            max_choice_chars=settings.max_choice_chars,
            max_choices=settings.max_choices,
            max_question_tokens=settings.max_question_tokens,
            max_choice_tokens=settings.max_choice_tokens,
            max_prompt_tokens=prompt,
        )

    def check_question(self, question: str) -> None:
        """Characters: run before the question is tokenised."""
        _bound("question_chars", len(question), self.max_question_chars, "question", "characters")

    def check_choices(self, choices: list[str]) -> None:
        """Count and characters: run before the choices are tokenised."""
        _bound("choices", len(choices), self.max_choices, "choices", "")
        for i, choice in enumerate(choices):
            _bound(
                "choice_chars", len(choice), self.max_choice_chars, f"choice {i + 1}", "characters"
            )

    def check_tokens(self, tokenizer, question: str, choices: list[str]) -> None:
        """Tokens per part; the text is already bounded in characters, so this is cheap."""
        n = len(tokenizer.encode(question, add_special_tokens=False))
        _bound("question_tokens", n, self.max_question_tokens, "question", "tokens")
        for i, choice in enumerate(choices):
            n = len(tokenizer.encode(choice, add_special_tokens=False))
            _bound("choice_tokens", n, self.max_choice_tokens, f"choice {i + 1}", "tokens")

    def check_prompt(self, n_tokens: int) -> None:
        """The whole prompt (audio block, question, lettered choices, answer cue)."""
        _bound("prompt_tokens", n_tokens, self.max_prompt_tokens, "the prompt", "tokens")


def _bound(limit: str, value: int, bound: int, what: str, unit: str) -> None:
    if value > bound:
        setting = f"QUAVER_MAX_{limit.upper()}"
        has = f"{what} has {value} {unit}".rstrip() if unit else f"{value} {what}"
        raise LimitExceeded(limit, value, bound, f"{has}; the limit is {bound} ({setting})")
