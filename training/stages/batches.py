"""Benchmark items -> model inputs, computed once and kept in memory for training.

Features are the same log-mel windows the server computes (app.audio), stored as float16 to halve
memory; the prompt ids come from the same PromptBuilder. Labels are answer indices.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from app.forward import PromptBatch, collate
from app.modeling import LoadedModel
from app.predict import Prepared
from training.data.controls import CONTROL_FAMILY
from training.data.manifest import Item, load_audio_file, read_manifest


@dataclass
class Example:
    prepared: Prepared
    label: int  # letter position of the answer in the prompt (0 = A), not item.answer_index
    item: Item

    @property
    def is_control(self) -> bool:
        """A control item: its audio holds no answer to its question (training.data.controls)."""
        return self.item.family == CONTROL_FAMILY


def prepare_split(
    loaded: LoadedModel, data_dir: Path, split: str, limit: int | None = None, progress: bool = True
) -> list[Example]:
    """Decode, featurise and tokenize every item of a split (progress bar)."""
    items = read_manifest(Path(data_dir), split)
    if limit is not None:
        items = items[:limit]
    out = []
    for item in tqdm(items, desc=f"prepare {split}", disable=not progress, leave=False):
        wave = load_audio_file(Path(data_dir), item)
        feats = loaded.features(wave)
        feats = replace(feats, features=feats.features.half())
        n_audio = loaded.family.audio_tokens_for_frames(feats.n_frames)
        prompt = loaded.prompts.build(n_audio, item.question, list(item.choices))
        label = prompt.letter_of(item.answer_index)  # the answer's letter (canonical order)
        out.append(Example(Prepared(feats, prompt, tuple(item.choices)), label, item))
    return out


def make_batch(examples: list[Example], pad_id: int) -> tuple[PromptBatch, torch.Tensor]:
    batch = collate(
        [e.prepared.prompt for e in examples], [e.prepared.audio for e in examples], pad_id
    )
    return batch, torch.tensor([e.label for e in examples], dtype=torch.long)


def answer_loss(lp: torch.Tensor, labels: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Mean training loss of a batch of answers.

    lp: (B, L) log-probabilities over the letters, -inf past each row's offered letters (as
    app.forward.choice_log_probs gives them); labels: (B,) the answer's letter; uniform: (B,)
    bool, rows trained towards the uniform distribution over their offered letters instead of
    their label. A uniform row's loss is the cross-entropy to uniform, -mean over offered j of
    lp[j] (log n_choices at its minimum); the others' is the NLL of the label.
    """
    nll = -lp.gather(1, labels[:, None])[:, 0]  # (B,)
    offered = torch.isfinite(lp)  # (B, L): the letters a row offers
    to_uniform = -lp.masked_fill(~offered, 0.0).sum(1) / offered.sum(1)  # (B,)
    return torch.where(uniform, to_uniform, nll).mean()


def length_batches(lengths: list[float], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (a clip's seconds or a prompt's tokens), in order of
    length, ties in index order. A batch is padded to its longest row, so grouping by length
    spends less of a pass on padding (on the real mix's 2-6 s clips, 22 % of the padded
    positions in manifest order). For passes whose rows do not see each other: prediction and
    the prefix cache, not training's shuffled batches (`bucketed_order`)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches for one epoch, reproducible from (seed, epoch)."""
    idx = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return [idx[i : i + batch_size] for i in range(0, n, batch_size)]


def bucketed_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, bucket_batches: int = 32
) -> list[list[int]]:
    """Like `epoch_order`, but each batch holds items of similar length (audio frames).

    The shuffled items are cut into pools of `bucket_batches` batches, each pool is sorted by
    length and cut into batches, and the batches are shuffled. A batch costs as much as its
    longest clip (the encoder window and the padded prompt), so this cuts a step's cost by about
    a third on the benchmark's 2-6 s clips, while batches stay random mixes of families.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    pool = batch_size * bucket_batches
    batches = []
    for i in range(0, len(idx), pool):
        chunk = sorted(idx[i : i + pool], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def iterate(examples: list, batch_size: int) -> Iterator[list]:
    for i in range(0, len(examples), batch_size):
        yield examples[i : i + batch_size]


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (T_i, d) tensors with zeros into (n, T_max, d); returns it and the lengths."""
    lengths = torch.tensor([len(r) for r in rows])
    out = rows[0].new_zeros(len(rows), int(lengths.max()), rows[0].shape[-1])
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out, lengths
