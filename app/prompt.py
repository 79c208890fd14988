"""The one prompt format shared by training and serving.

A multiple-choice audio question becomes

    <|audio_bos|><|AUDIO|> x n_audio<|audio_eos|>
    Question: How many beeps are there?
    A. two
    B. three
    Answer:

and the prediction is the next-token distribution over the choice letters (" A", " B", ...) at the
last position, renormalised over the letters of the offered choices only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.family import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN

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


@dataclass
class PromptIds:
    """Token ids of one prompt, with the audio block expanded to `n_audio` audio tokens."""

    ids: torch.Tensor  # (T,) int64
    n_audio: int
    n_choices: int


class PromptBuilder:
    """Turns (n_audio, question, choices) into token ids for one tokenizer."""

    def __init__(self, tokenizer, audio_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.audio_token_id = audio_token_id
        enc = tokenizer.convert_tokens_to_ids([AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS])
        if enc[1] != audio_token_id:
            raise PromptError(
                f"tokenizer maps {AUDIO_TOKEN} to {enc[1]}, model expects {audio_token_id}"
            )
        self.bos_id, self.eos_id = enc[0], enc[2]
        self.letter_ids = letter_token_ids(tokenizer)

    def build(self, n_audio: int, question: str, choices: list[str] | tuple[str, ...]) -> PromptIds:
        text_ids = self.tokenizer.encode(format_text(question, choices), add_special_tokens=False)
        ids = [self.bos_id, *([self.audio_token_id] * n_audio), self.eos_id, *text_ids]
        return PromptIds(torch.tensor(ids, dtype=torch.long), n_audio, len(choices))
