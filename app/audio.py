"""Audio decoding and features.

Bytes of any format libsndfile reads (WAV, FLAC, OGG, MP3 where supported) -> mono float32 at
16 kHz -> Whisper log-mel features padded to the model's window. Errors are typed so the web layer
can map them to status codes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from app.family import HOP_LENGTH, SAMPLE_RATE


class AudioError(ValueError):
    """Audio that cannot be used; `kind` tells which (for the HTTP status)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind  # "invalid" | "unsupported" | "too_long"


MAX_CHANNELS = 8  # more is refused: each one costs memory before the mix-down
MAX_RATE = 192_000  # Hz; likewise


def decode(data: bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file's bytes to (samples (n, channels) float32, sample_rate).

    With `max_seconds`, at most that much audio (plus one frame) is ever decoded, whatever the
    header claims: a small compressed file can hold hours of silence (10 MB of FLAC decode to
    gigabytes), so the length is learnt by reading, not by trusting the header, and a longer clip
    is refused as "too_long" without decoding the rest.
    """
    import soundfile as sf  # imported here: the compute path (features, engine) needs no libsndfile

    if not data:
        raise AudioError("audio file is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            if not 0 < channels <= MAX_CHANNELS:
                raise AudioError(f"audio has {channels} channels; at most {MAX_CHANNELS} are read")
            if not 0 < rate <= MAX_RATE:
                raise AudioError(f"sample rate {rate} Hz is outside 1-{MAX_RATE} Hz")
            frames = -1 if max_seconds is None else int(max_seconds * rate) + 1
            samples = f.read(frames=frames, dtype="float32", always_2d=True)
        if max_seconds is not None and len(samples) >= frames:
            raise AudioError(
                f"audio is longer than the model's window of {max_seconds:.2f} s", "too_long"
            )
    except AudioError:
        raise
    except sf.LibsndfileError as exc:
        msg = str(exc).rsplit(">: ", 1)[-1]  # drop libsndfile's "Error opening <BytesIO ...>"
        kind = "unsupported" if "format" in msg.lower() else "invalid"
        raise AudioError(f"cannot decode audio: {msg}", kind) from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"cannot decode audio: {exc}") from exc
    return samples, rate


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of a mono signal (windowed-sinc polyphase via FFT)."""
    if rate == target:
        return x
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    n_out = round(len(x) * target / rate)
    if n_out == 0:
        raise AudioError("audio is too short")
    # FFT resampling: exact for band-limited periodic signals, good enough for speech/events.
    spec = np.fft.rfft(x.astype(np.float64))
    n_bins = n_out // 2 + 1
    out_spec = np.zeros(n_bins, dtype=np.complex128)
    keep = min(n_bins, len(spec))
    out_spec[:keep] = spec[:keep]
    return (np.fft.irfft(out_spec, n_out) * (n_out / len(x))).astype(np.float32)


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """(n, channels) at `rate` -> (n',) float32 at 16 kHz; rejects NaN/inf and empty audio."""
    if samples.size == 0:
        raise AudioError("audio has no samples")
    if not np.isfinite(samples).all():
        raise AudioError("audio contains NaN or infinite samples")
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    return resample(mono.astype(np.float32), rate)


@dataclass(frozen=True)
class AudioFeatures:
    """Log-mel features of one clip, padded to the encoder window."""

    features: torch.Tensor  # (n_mels, window_frames) float32
    n_frames: int  # valid frames (the rest is padding)
    duration_s: float


class FeatureExtractor:
    """Whisper log-mel features with a fixed window (`window_frames` frames of 10 ms).

    Computes exactly what `transformers.WhisperFeatureExtractor` computes on the clip padded to
    the window, but runs the STFT only over the clip (plus enough zeros for the frames that
    overlap its end) and fills the rest with the value silence takes, which Whisper's
    normalisation fixes: max(log10(1e-10), global_max - 8), then (x + 4) / 4.
    """

    N_FFT = 400

    def __init__(self, n_mels: int, window_frames: int) -> None:
        from transformers import WhisperFeatureExtractor

        self.n_mels = n_mels
        self.window_frames = window_frames
        self.max_samples = window_frames * HOP_LENGTH
        reference = WhisperFeatureExtractor(
            feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, n_fft=self.N_FFT
        )
        self.mel_filters = torch.from_numpy(reference.mel_filters).float()  # (n_fft/2+1, n_mels)
        self.window = torch.hann_window(self.N_FFT)

    @property
    def max_seconds(self) -> float:
        return self.max_samples / SAMPLE_RATE

    def __call__(self, wave: np.ndarray) -> AudioFeatures:
        """wave: (n,) float32 at 16 kHz, at most the window long (never silently cut)."""
        n = len(wave)
        if n > self.max_samples:
            raise AudioError(
                f"audio is {n / SAMPLE_RATE:.2f} s; the model's window is {self.max_seconds:.2f} s",
                "too_long",
            )
        if n < HOP_LENGTH:
            raise AudioError("audio is shorter than 10 ms")
        n_frames = n // HOP_LENGTH  # frames Whisper's attention mask marks as real
        # Frames t < seg_frames see only the clip and zeros, as in the full window.
        seg_samples = min(self.max_samples, (n_frames + 4) * HOP_LENGTH + self.N_FFT)
        x = torch.zeros(seg_samples)
        x[:n] = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        stft = torch.stft(x, self.N_FFT, HOP_LENGTH, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2  # (n_fft/2+1, frames)
        log_spec = torch.clamp(self.mel_filters.T @ power, min=1e-10).log10()  # (n_mels, frames)
        silence = torch.tensor(-10.0)  # log10 of the clamp floor: what zero input gives
        top = torch.maximum(log_spec.max(), silence)
        floor = top - 8.0
        log_spec = torch.maximum(log_spec, floor)
        seg_frames = min(log_spec.shape[1], self.window_frames)
        out = torch.full((self.n_mels, self.window_frames), float(torch.maximum(silence, floor)))
        out[:, :seg_frames] = log_spec[:, :seg_frames]
        return AudioFeatures((out + 4.0) / 4.0, n_frames, n / SAMPLE_RATE)
