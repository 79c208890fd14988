"""A small byte-level BPE tokenizer trained locally for the tiny model.

The tiny model needs a tokenizer that no hub provides: this trains one with `tokenizers` on the
benchmark's question/choice text (plus the prompt scaffolding), with the Qwen2-Audio audio special
tokens and single-token option letters (" A" ... " J") guaranteed.

    from training.base.tokenizer import train_tokenizer
    tok = train_tokenizer(texts, vocab_size=1024)
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from app.family import AUDIO_SPECIAL_TOKENS
from app.prompt import LETTERS, format_text

PAD, EOS = "<|pad|>", "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, chat_tokens: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts`; specials: pad, eos, the three audio tokens and `chat_tokens`
    (e.g. Qwen2.5-Omni's "<|im_start|>", "<|im_end|>")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, EOS, *AUDIO_SPECIAL_TOKENS, *chat_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The scaffolding (lettered choices, " A".." J" answers) is repeated so its merges always exist.
    scaffold = [format_text("q", [f"c{i}" for i in range(len(LETTERS))]) + f" {x}" for x in LETTERS]
    tok.train_from_iterator([*scaffold * 50, *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    fast.add_special_tokens({"additional_special_tokens": [*AUDIO_SPECIAL_TOKENS, *chat_tokens]})
    return fast
