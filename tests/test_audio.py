"""Audio decoding, resampling, and features identical to Whisper's feature extractor."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from app.audio import AudioError, FeatureExtractor, decode, resample, to_mono_16k
from tests.conftest import tone, wav_bytes


@pytest.mark.parametrize("seconds", [0.02, 1.0, 3.33, 9.99, 10.0])
def test_features_equal_whisper_feature_extractor(seconds):
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)
    ours = FeatureExtractor(80, 1000)(wave)
    ref = WhisperFeatureExtractor(feature_size=80, chunk_length=10, n_samples=160000)(
        wave,
        sampling_rate=16000,
        padding="max_length",
        max_length=160000,
        return_tensors="pt",
        return_attention_mask=True,
    )
    torch.testing.assert_close(
        ours.features, ref["input_features"][0, :, :1000], atol=1e-5, rtol=1e-5
    )
    assert ours.n_frames == int(ref["attention_mask"][0, :1000].sum())


def test_too_long_is_refused_not_cut():
    with pytest.raises(AudioError) as exc:
        FeatureExtractor(80, 1000)(np.zeros(160001, np.float32))
    assert exc.value.kind == "too_long"


def test_decode_downmix_and_resample():
    data = wav_bytes(tone(1.0, 441.0, rate=44100), rate=44100, channels=2)
    samples, rate = decode(data)
    assert rate == 44100 and samples.shape == (44100, 2)
    mono = to_mono_16k(samples, rate)
    assert mono.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(mono))
    assert abs(np.argmax(spectrum) - 441) <= 1  # the tone survives resampling at its pitch
    assert resample(mono, 16000) is mono


@pytest.mark.parametrize(
    ("data", "kind"), [(b"", "invalid"), (b"not audio at all" * 10, "unsupported")]
)
def test_bad_bytes(data, kind):
    with pytest.raises(AudioError) as exc:
        decode(data)
    assert exc.value.kind == kind


def test_nan_is_refused():
    with pytest.raises(AudioError, match="NaN"):
        to_mono_16k(np.array([[0.0], [np.nan]], np.float32), 16000)


def test_decode_reads_no_more_than_the_window_whatever_the_file_holds():
    """A small compressed file can hold hours of silence: decoding stops past the window."""
    import tracemalloc

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=8000, channels=1, format="FLAC") as f:
        for _ in range(10):
            f.write(np.zeros(8000 * 60, np.int16))  # 10 minutes: 19 MB once decoded to float32
    data = buf.getvalue()
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(AudioError) as e:
            decode(data, max_seconds=10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.kind == "too_long" and "10.00 s" in str(e.value)
    assert peak < 2_000_000  # 10 s at 8 kHz is 320 kB of float32; the whole file would be 19 MB
    samples, rate = decode(data)  # without a bound: all of it
    assert rate == 8000 and len(samples) == 8000 * 600


@pytest.mark.parametrize(
    ("channels", "rate", "message"), [(9, 16000, "9 channels"), (1, 384000, "sample rate 384000")]
)
def test_decode_refuses_too_many_channels_or_too_high_a_rate(channels, rate, message):
    buf = io.BytesIO()
    sf.write(buf, np.zeros((160, channels), np.float32), rate, format="WAV")
    with pytest.raises(AudioError, match=message):
        decode(buf.getvalue(), max_seconds=10.0)
