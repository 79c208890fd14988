"""The one prompt format shared by training and serving.

A multiple-choice audio question becomes

    <|audio_bos|><|AUDIO|> x n_audio<|audio_eos|>
    Question: How many beeps are there?
    A. two
    B. three
    Answer:

and the prediction is the next-token distribution over the choice letters (" A", " B", ...) at the
last position, renormalised over the letters of the offered choices only. A family with a chat
format (Qwen2.5-Omni, `app.family.ModelFamily.wrap_prompt`) puts its system and user turns around
the same block and opens the assistant turn with the cue "Answer:"; the letters are the same.

The choices are lettered in a canonical order (sorted by their text, case-insensitively), not in
the order the user sent them; `PromptIds.order` maps each letter back to the user's choice, and
the predictor reports probabilities in the user's order. So the answer never depends on how the
choices are listed (multiple-choice LMs are known to be biased by option position), and the model
reads the answer off its hidden state without first having to find which letter carries it: a
fixed set of choices always gets the same letters. Measured on the earlier (synthetic)
default (docs/default_model_synthetic.md): the answer is linearly readable from the layer-26
state of the last token, but 3000 training items with shuffled letters did not teach the top
layers to find it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from app.family import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN

# Bumped whenever the prompt text changes: caches of hidden states and predictions key on it.
PROMPT_VERSION = 2  # 2: choices in canonical order
LETTERS = "ABCDEFGHIJ"
MAX_CHOICES = len(LETTERS)
MIN_CHOICES = 2


class PromptError(ValueError):
    """The question or choices cannot be turned into a prompt."""


def format_text(question: str, choices: list[str] | tuple[str, ...]) -> str:
    """The text after the audio block (question, lettered choices, answer cue)."""
    question = " ".join(question.split())
    if not question:
        raise PromptError("question is empty")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        raise PromptError(f"need {MIN_CHOICES}-{MAX_CHOICES} choices, got {len(choices)}")
    lines = [f"Question: {question}"]
    seen: set[str] = set()
    for letter, choice in zip(LETTERS, choices, strict=False):
        text = " ".join(str(choice).split())
        if not text:
            raise PromptError(f"choice {letter} is empty")
        if text.lower() in seen:
            raise PromptError(f"duplicate choice: {text!r}")
        seen.add(text.lower())
        lines.append(f"{letter}. {text}")
    lines.append("Answer:")
    return "\n" + "\n".join(lines)


def letter_token_ids(tokenizer) -> list[int]:
    """Token id of " A", " B", ... as they follow "Answer:"; each must be a single token."""
    ids = []
    for letter in LETTERS:
        enc = tokenizer.encode(" " + letter, add_special_tokens=False)
        if len(enc) != 1:
            raise PromptError(f"tokenizer splits ' {letter}' into {len(enc)} tokens; need one")
        ids.append(enc[0])
    return ids


def canonical_order(choices: list[str] | tuple[str, ...]) -> tuple[int, ...]:
    """Indices of `choices` in the order they are lettered: sorted by whitespace-normalised,
    lower-cased text (ties, which format_text rejects, keep the user's order)."""
    return tuple(
        sorted(range(len(choices)), key=lambda i: " ".join(str(choices[i]).split()).lower())
    )


@dataclass
class PromptIds:
    """Token ids of one prompt, with the audio block expanded to `n_audio` audio tokens."""

    ids: torch.Tensor  # (T,) int64
    n_audio: int
    n_choices: int
    # order[j] = index in the user's choices of the choice shown with letter j
    order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.order:
            self.order = tuple(range(self.n_choices))

    def letter_of(self, user_index: int) -> int:
        """Letter position (0 = A) of the user's choice `user_index`: a training label."""
        return self.order.index(user_index)

    def to_user_order(self, probs: np.ndarray) -> np.ndarray:
        """(..., C) probabilities per letter -> the same per user choice."""
        out = np.empty_like(probs)
        out[..., list(self.order)] = probs
        return out


class PromptBuilder:
    """Turns (n_audio, question, choices) into token ids for one tokenizer."""

    def __init__(
        self,
        tokenizer,
        audio_token_id: int,
        wrap: Callable[[str], tuple[str, str] | None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.audio_token_id = audio_token_id
        self.wrap = wrap  # the family's chat format (None: the plain format)
        enc = tokenizer.convert_tokens_to_ids([AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS])
        if enc[1] != audio_token_id:
            raise PromptError(
                f"tokenizer maps {AUDIO_TOKEN} to {enc[1]}, model expects {audio_token_id}"
            )
        self.bos_id, self.eos_id = enc[0], enc[2]
        self.letter_ids = letter_token_ids(tokenizer)

    def build(self, n_audio: int, question: str, choices: list[str] | tuple[str, ...]) -> PromptIds:
        order = canonical_order(choices)
        text = format_text(question, [choices[i] for i in order])
        wrapped = self.wrap(text) if self.wrap is not None else None
        before_ids = []
        if wrapped is not None:
            before, text = wrapped
            before_ids = self.tokenizer.encode(before, add_special_tokens=False)
        text_ids = self.tokenizer.encode(text, add_special_tokens=False)
        audio = [self.bos_id, *([self.audio_token_id] * n_audio), self.eos_id]
        ids = [*before_ids, *audio, *text_ids]
        return PromptIds(torch.tensor(ids, dtype=torch.long), n_audio, len(choices), order)
