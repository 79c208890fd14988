"""Hidden states entering the first LoRA layer, cached per split: the frozen part of a pass.

Nothing below the first LoRA layer trains, so every LoRA stage (and every prediction of a
posterior with LoRA in the same layers) computes the same states there. `CachedPrefix` keeps
them for a training run, on disk under `prefix_cache_key` when a folder is given; evaluation's
`training.eval.predictions.PrefixCache` reads and writes the same files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from tqdm import tqdm

from app.family import QWEN2_AUDIO, ModelFamily
from app.forward import prefix_hidden
from app.modeling import base_identity
from app.prompt import PROMPT_VERSION
from training.stages.batches import Example, length_batches, make_batch, pad_rows


def prefix_cache_key(
    base_dir: Path,
    data_dir: Path,
    split: str,
    first_layer: int,
    limit: int | None = None,
    overlay_sha: str | None = None,
    dtype: str = "float32",
) -> str:
    """File stem of one split's cached prefix hidden states (the states entering `first_layer`).

    One key for fine-tuning (CachedPrefix) and prediction (training.eval.predictions.PrefixCache),
    so a split cached by either is reused by the other. It covers everything the states depend
    on: the base's content (app.modeling.base_identity: weights, tokenizer, config), a base
    overlay applied at load (its sha256), the benchmark, the split and its limit, the first LoRA
    layer, the prompt format (app.prompt.PROMPT_VERSION), and the base's dtype when it is not
    float32 (bf16 states differ; fp32 keys stay what they were before the setting existed).
    """
    h = hashlib.sha256(base_identity(base_dir).encode())
    h.update((Path(data_dir) / "dataset.json").read_bytes())
    h.update(f"|{split}|{limit}|{first_layer}".encode())
    h.update(f"|prompt v{PROMPT_VERSION}".encode())
    if overlay_sha is not None:
        h.update(f"|overlay {overlay_sha}".encode())
    if dtype != "float32":
        h.update(f"|dtype {dtype}".encode())
    return f"{split}-L{first_layer}-{h.hexdigest()[:16]}"


class CachedPrefix:
    """Hidden states entering the first LoRA layer, per example (computed once, frozen base).

    With `store`, they are kept on disk under a key of everything they depend on (the base's
    content, the data, the split and its limit, the first LoRA layer), so later runs on the
    same base (other seeds, optimizers, hyperparameters) load them instead of recomputing.
    They are kept on the host; `batch` returns them on the model's device.
    """

    def __init__(
        self,
        model,
        examples: list[Example],
        split: int,
        pad_id: int,
        progress: bool,
        store: Path | None = None,
        key: str = "",
        family: ModelFamily = QWEN2_AUDIO,
    ):
        self.hidden: list[torch.Tensor] = []
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        path = Path(store) / f"{key}.pt" if store is not None else None
        if path is not None and path.exists():
            self.hidden = torch.load(path, weights_only=True)
            if len(self.hidden) == len(examples):
                return
            self.hidden = []
        # batches of similar prompt length (less padding: rows do not see each other), stored
        # in the examples' order
        lengths = [len(ex.prepared.prompt.ids) for ex in examples]
        hidden: list[torch.Tensor | None] = [None] * len(examples)
        with torch.no_grad():
            for index in tqdm(
                length_batches(lengths, 16), desc="cache prefix", disable=not progress, leave=False
            ):
                batch, _ = make_batch([examples[i] for i in index], pad_id)
                h = prefix_hidden(model, batch.to(self.device), split, family)  # (b, T, d)
                for j, i in enumerate(index):
                    hidden[i] = h[j, : lengths[i]].to("cpu", copy=True)
        self.hidden = hidden
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs may write it too
            torch.save(self.hidden, tmp)
            tmp.replace(path)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        h, lengths = pad_rows([self.hidden[i] for i in idx])
        return h.to(self.device), lengths.to(self.device)


class LivePrefix:
    """The same interface as `CachedPrefix` with nothing cached: the states entering layer
    `split` are computed per batch (frozen, without gradients). Used when LoRA reaches layer 0,
    where a cache would only hold the audio tower's output spliced into the token embeddings,
    (items x T x d) values, which for a 7B base is more memory than recomputing is time."""

    def __init__(self, model, examples: list[Example], split: int, pad_id: int, family) -> None:
        self.model, self.examples, self.split, self.pad_id = model, examples, split, pad_id
        self.family = family
        self.device = next(model.parameters()).device

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # collated outside any autocast (the stored fp16 features are data, not compute); the
        # frozen layers below run under the caller's autocast when it has one
        with torch.autocast(self.device.type, enabled=False):
            batch, _ = make_batch([self.examples[i] for i in idx], self.pad_id)
        batch = batch.to(self.device)
        with torch.no_grad():
            h = prefix_hidden(self.model, batch, self.split, self.family)
        return h, batch.lengths
