"""K-sample prediction: the pure-compute core used by `quaver ask`, evaluation and the server.

    predictor = Predictor(loaded_model, posterior)
    prepared = predictor.prepare(wave_16k, "Which is louder?", ["first", "second"])
    [pred] = predictor.predict([Request(prepared, samples=8, seed=0)])
    pred.probs, pred.confidence, pred.mutual_information

A request with `samples == 1` runs at the posterior mean (the deterministic pass); with K >= 2 it
draws K independent weight samples and averages their softmax outputs (Bayesian model averaging).
All requests of one call share one forward pass: audio encoder and the decoder layers below the
first LoRA layer run once per request (R rows), the layers above at sum(K_i) rows.

With `Predictor(..., decision=Decision(...))` (the server passes the posterior's own, see
`app.scores`), `probs` are the decision's (temperature-scaled when it says so) and `confidence`
is its score ("maxprob", "risk_averse", "mutual_information" or "answerable"), named in
`Prediction.score`. Without one, confidence is the max BMA probability, as always.
With a control probe (`app.control`, stored beside the posterior), every prediction also carries
`p_control`, the probability that the audio holds no answer, read off the prefix states once per
request (before the K-row suffix), which the "answerable" score uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.audio import AudioFeatures
from app.control import ControlProbe, load_control_probe
from app.forward import (
    PromptBatch,
    StopCheck,
    choice_log_probs,
    collate,
    prefix_hidden,
    suffix_letter_logits,
)
from app.lora import (
    PosteriorSampler,
    SampleSet,
    active_samples,
    attach_posterior,
    concat_factors,
    detach_posterior,
)
from app.modeling import LoadedModel
from app.posterior import Posterior, PosteriorError
from app.prompt import PromptIds
from app.scores import Decision


@dataclass(frozen=True)
class Prepared:
    """A validated question with its audio features and token ids (CPU tensors)."""

    audio: AudioFeatures
    prompt: PromptIds
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Request:
    prepared: Prepared
    samples: int = 1  # 1 = posterior mean; K >= 2 = K weight samples
    seed: int = 0


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (C,) BMA probabilities over the offered choices
    sample_probs: np.ndarray  # (K, C) per-sample probabilities
    answer_index: int
    confidence: float  # max of probs, or the decision's score (see `score`)
    entropy: float  # H(probs), nats
    mutual_information: float  # H(mean_k p_k) - mean_k H(sample_probs[k]), nats
    agreement: float  # fraction of samples whose argmax equals answer_index
    score: str = "maxprob"  # what `confidence` is (app.scores.SCORES)
    p_control: float | None = None  # the control probe's P(no answer in the audio); None: none


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(-1)


def summarize(
    sample_probs: np.ndarray, decision: Decision | None = None, p_control: float | None = None
) -> Prediction:
    """BMA summary of (K, C) per-sample probabilities; with a `decision`, its probabilities
    (temperature-scaled when it has a temperature) and its score as the confidence.
    `p_control`: the request's control-probe probability (kept; the "answerable" score uses it)."""
    probs = sample_probs.mean(0)
    answer = int(probs.argmax())
    mi = max(0.0, float(_entropy(probs)) - float(_entropy(sample_probs).mean()))
    agree = float((sample_probs.argmax(-1) == answer).mean())
    if decision is None:
        h = float(_entropy(probs))
        conf = float(probs[answer])
        return Prediction(probs, sample_probs, answer, conf, h, mi, agree, p_control=p_control)
    shown, conf = decision.apply(sample_probs, p_control)  # temperature keeps the argmax
    shown = shown.astype(np.float32)
    h = float(_entropy(shown))
    return Prediction(shown, sample_probs, answer, conf, h, mi, agree, decision.score, p_control)


class Predictor:
    """Scores multiple-choice questions about audio with a model and (optionally) a posterior."""

    def __init__(
        self,
        loaded: LoadedModel,
        posterior: Posterior | None = None,
        decision: Decision | None = None,
        control_probe: ControlProbe | None = None,
    ) -> None:
        self.loaded = loaded
        self.posterior = posterior
        self.decision = decision  # None: confidence = max BMA probability (evaluation's arrays)
        self.control_probe = control_probe  # None: no p_control (and no "answerable" score)
        model = loaded.model
        self.split = loaded.num_layers
        self.sampler = None
        if posterior is not None:
            attach_posterior(model, posterior)
            self.split = posterior.spec.first_layer
            dtype = next(model.parameters()).dtype
            self.sampler = PosteriorSampler(posterior, loaded.device, dtype)
        if decision is not None and decision.needs_probe and control_probe is None:
            raise PosteriorError(f"the served score {decision.score!r} needs a control probe")
        if control_probe is not None and control_probe.layer != self.split:
            raise PosteriorError(
                f"the control probe reads layer {control_probe.layer}, the prefix ends at "
                f"layer {self.split}"
            )
        self.letter_ids = loaded.letter_ids
        self.pad_id = loaded.tokenizer.pad_token_id or 0

    @classmethod
    def from_dirs(
        cls,
        model_dir: str | Path,
        posterior_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        use_decision: bool = False,
    ) -> Predictor:
        """Load a base checkpoint and a posterior directory the one way everything does: the
        posterior is validated against the base, then its base overlay (if any, e.g. the
        default's trained projector) is copied in, then the posterior is attached.
        `use_decision`: serve the posterior's "decision" (the server and `quaver ask` do; the
        evaluation keeps raw probabilities)."""
        from app.modeling import load_checkpoint
        from app.overlay import apply_overlay
        from app.posterior import load_posterior

        loaded = load_checkpoint(model_dir, device=device, dtype=dtype)
        posterior = load_posterior(posterior_dir, expected_base=loaded.identity, model=loaded.model)
        apply_overlay(posterior_dir, loaded)
        probe = load_control_probe(
            posterior_dir,
            posterior.meta,
            first_layer=posterior.spec.first_layer,
            hidden_size=loaded.family.language_model(loaded.model).embed_tokens.embedding_dim,
        )
        # no "decision" stored: exactly the plain max-probability rule (decision None)
        serve = use_decision and "decision" in posterior.meta
        decision = Decision.from_meta(posterior.meta) if serve else None
        return cls(loaded, posterior, decision, probe)

    @property
    def calibration(self) -> dict | None:
        """The threshold table on the served score: the decision's own when it has one, else
        the posterior's "calibration" (None without a posterior)."""
        if self.decision is not None and self.decision.calibration is not None:
            return self.decision.calibration
        return self.posterior.calibration if self.posterior is not None else None

    @property
    def score(self) -> str:
        """Name of the served confidence score."""
        return self.decision.score if self.decision is not None else "maxprob"

    @property
    def needs_samples(self) -> bool:
        """Whether the served score needs K >= 2 samples (adaptive sampling always redoes)."""
        return self.decision is not None and self.decision.needs_samples

    def detach(self) -> None:
        """Give the model back as it was handed in: the posterior mean merged at construction is
        subtracted again (app.lora.detach_posterior), so the base can take another posterior.
        The predictor is unusable afterwards."""
        if self.posterior is not None:
            detach_posterior(self.loaded.model)
            self.posterior, self.sampler = None, None

    @property
    def max_seconds(self) -> float:
        return self.loaded.features.max_seconds

    def prepare(
        self, wave: np.ndarray, question: str, choices: list[str] | tuple[str, ...]
    ) -> Prepared:
        """Features + prompt ids for one question (raises AudioError / PromptError)."""
        feats = self.loaded.features(wave)
        n_audio = self.loaded.family.audio_tokens_for_frames(feats.n_frames)
        prompt = self.loaded.prompts.build(n_audio, question, choices)
        return Prepared(feats, prompt, tuple(choices))

    def batch(self, prepared: list[Prepared]) -> PromptBatch:
        return collate([p.prompt for p in prepared], [p.audio for p in prepared], self.pad_id)

    @torch.inference_mode()
    def prefix(
        self, prepared: list[Prepared], should_stop: StopCheck = None
    ) -> tuple[torch.Tensor, PromptBatch]:
        """Hidden states entering the first LoRA layer, (R, T, d), and the batch they came from:
        the part of a pass that every posterior sample (and every posterior with the same LoRA
        layers on the same base) shares."""
        batch = self.batch(prepared).to(self.loaded.device)
        h = prefix_hidden(self.loaded.model, batch, self.split, self.loaded.family, should_stop)
        return h, batch

    @torch.inference_mode()
    def predict(
        self,
        requests: list[Request],
        prefix: tuple[torch.Tensor, PromptBatch] | None = None,
        should_stop: StopCheck = None,
    ) -> list[Prediction]:
        """One forward pass for all requests; returns one Prediction per request.

        `prefix`: `self.prefix([r.prepared for r in requests])` computed earlier (evaluation
        reuses it across passes and posteriors); computed here when None.
        `should_stop`: asked at every layer boundary; True abandons the pass
        (`app.forward.Abandoned`), as the engine does for a batch whose callers all gave up.
        """
        if not requests:
            return []
        device = self.loaded.device
        if prefix is None:
            prefix = self.prefix([r.prepared for r in requests], should_stop)
        h, batch = prefix
        p_control = [None] * len(requests)
        if self.control_probe is not None:  # (R,) from the R prefix rows, before the K repeat
            audio = batch.ids == self.loaded.family.audio_token_id(self.loaded.model)
            p_control = self.control_probe.p_control(h, audio).cpu().tolist()
        ks = [r.samples if self.sampler is not None else 1 for r in requests]
        repeats = torch.tensor(ks, device=device)
        h = h.repeat_interleave(repeats, dim=0)  # (sum K, T, d)
        lengths = batch.lengths.repeat_interleave(repeats)
        n_choices = batch.n_choices.repeat_interleave(repeats)
        samples = self._draw(requests, ks)
        with active_samples(samples):
            logits = suffix_letter_logits(
                self.loaded.model,
                h,
                lengths,
                self.split,
                self.letter_ids,
                self.loaded.family,
                should_stop,
            )
        probs = choice_log_probs(logits, n_choices).exp().float().cpu().numpy()
        out, start = [], 0
        for req, k, pc in zip(requests, ks, p_control, strict=True):
            c = len(req.prepared.choices)
            # letters -> the user's order of the choices (app.prompt: canonical lettering)
            user = req.prepared.prompt.to_user_order(probs[start : start + k, :c])
            out.append(summarize(user, self.decision, pc))
            start += k
        return out

    def _draw(self, requests: list[Request], ks: list[int]) -> SampleSet | None:
        if self.sampler is None:
            return None
        rows, parts, start = [], [], 0
        for req, k in zip(requests, ks, strict=True):
            if k >= 2:
                gen = torch.Generator(device=self.loaded.device).manual_seed(int(req.seed))
                parts.append(self.sampler.draw(k, gen))
                rows.extend(range(start, start + k))
            start += k
        if not rows:
            return None
        index = torch.tensor(rows, device=self.loaded.device)
        return SampleSet(index, concat_factors(parts), every_row=len(rows) == start)
