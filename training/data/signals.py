"""Signal primitives of the synthetic benchmark, rendered with numpy at 16 kHz.

Events (tones, glides, FM "warbles", noise bursts, click trains), noise beds (coloured noise with a
spectral exponent: white 0, pink 1, brown 2; and the held-out "hum" and "babble" beds of the
shift split) and the band-limited SNR rule used to place events over a bed:

    snr_db = 10 log10(E_event[b] / E_bed[b]),  b = the third-octave band holding most event energy

so a pure tone "at 20 dB" stands 20 dB above the bed in its own band, as a listener hears it, while
a broadband burst is measured where it is strongest. Every function is pure given its `rng`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SR = 16_000  # Hz
NYQUIST = SR / 2

# Third-octave band centres 100 Hz .. 6.3 kHz (base-2, 1 kHz reference) and their edges.
_BAND_CENTRES = 1000.0 * 2.0 ** (np.arange(-10, 9) / 3.0)
BAND_EDGES = np.stack([_BAND_CENTRES * 2 ** (-1 / 6), _BAND_CENTRES * 2 ** (1 / 6)], axis=1)

TIMBRES_IN = ("sine",)  # oscillator waveforms of the in-distribution splits
TIMBRES_SHIFT = ("square", "sawtooth")  # unseen timbres of the shift split


def n_samples(seconds: float) -> int:
    return round(seconds * SR)


def fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT lengths with large prime factors are many times slower."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def fade(x: np.ndarray, fade_s: float = 0.008) -> np.ndarray:
    """Raised-cosine fade in/out (avoids onset clicks); x: (n,)."""
    n = min(n_samples(fade_s), len(x) // 2)
    if n <= 1:
        return x
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
    out = x.copy()
    out[:n] *= ramp
    out[-n:] *= ramp[::-1]
    return out


def unit_rms(x: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(x**2)))
    return x / rms if rms > 0 else x


@lru_cache(maxsize=256)
def _wavetable(timbre: str, n_harmonics: int, size: int = 4096) -> np.ndarray:
    """One period of a band-limited waveform with `n_harmonics` harmonics; (size,), cached."""
    theta = 2 * np.pi * np.arange(size) / size
    if timbre == "sine" or n_harmonics <= 1:
        return np.sin(theta)
    table = np.zeros(size)
    for k in range(1, n_harmonics + 1):
        if timbre == "square":
            if k % 2 == 1:
                table += np.sin(k * theta) / k
        elif timbre == "sawtooth":
            table += (-1) ** (k + 1) * np.sin(k * theta) / k
        else:
            raise ValueError(f"unknown timbre {timbre!r}")
    table.setflags(write=False)
    return table


def oscillator(freq: np.ndarray, timbre: str = "sine") -> np.ndarray:
    """Waveform following the instantaneous frequency `freq` (n,) in Hz; band-limited."""
    phase = np.cumsum(freq) / SR  # cycles
    if timbre == "sine":
        return np.sin(2 * np.pi * phase)
    # Harmonics up to 0.45 SR at the highest instantaneous frequency: no aliasing.
    n_harm = max(1, int(0.45 * SR / float(np.max(freq))))
    table = _wavetable(timbre, n_harm)
    pos = (phase % 1.0) * len(table)
    i0 = pos.astype(np.int64) % len(table)
    frac = pos - np.floor(pos)
    return table[i0] * (1 - frac) + table[(i0 + 1) % len(table)] * frac


def tone(f0: float, f1: float, seconds: float, timbre: str = "sine") -> np.ndarray:
    """Steady tone (f0 == f1) or log glide f0 -> f1, faded, unit RMS."""
    n = n_samples(seconds)
    t = np.arange(n) / max(n - 1, 1)
    freq = f0 * (f1 / f0) ** t
    return unit_rms(fade(oscillator(freq, timbre)))


def warble(f0: float, rate_hz: float, depth: float, seconds: float, timbre: str = "sine"):
    """Frequency-modulated tone: f(t) = f0 (1 + depth sin(2 pi rate t)); unit RMS."""
    t = np.arange(n_samples(seconds)) / SR
    freq = f0 * (1 + depth * np.sin(2 * np.pi * rate_hz * t))
    return unit_rms(fade(oscillator(freq, timbre)))


def noise_burst(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise burst, faded, unit RMS."""
    return unit_rms(fade(rng.standard_normal(n_samples(seconds)), 0.005))


def click_train(seconds: float, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Clicks (2 ms decaying broadband pulses) at `rate_hz`, unit RMS."""
    n = n_samples(seconds)
    out = np.zeros(n)
    m = n_samples(0.002)
    pulse = rng.standard_normal(m) * np.exp(-np.arange(m) / (m / 4))
    for onset in np.arange(0.0, seconds - 0.002, 1.0 / rate_hz):
        i = n_samples(onset)
        out[i : i + m] += pulse[: n - i]
    return unit_rms(out)


def coloured_noise(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with power spectrum ~ f^-alpha above 20 Hz (0 white, 1 pink, 2 brown); unit RMS."""
    m = fast_len(n)  # shape a longer block, keep the first n samples
    spec = np.fft.rfft(rng.standard_normal(m))
    f = np.fft.rfftfreq(m, 1 / SR)
    spec *= np.maximum(f, 20.0) ** (-alpha / 2)  # amplitude ~ f^(-alpha/2)
    spec[0] = 0.0
    return unit_rms(np.fft.irfft(spec, m)[:n])


def hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mains-like hum: harmonics of 50/60 Hz (slow drift, 1/k^0.7 roll-off) + faint pink floor."""
    f0 = float(rng.choice([50.0, 60.0])) * (1 + rng.uniform(-0.005, 0.005))
    t = np.arange(n) / SR
    drift = 1 + 0.003 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t)
    phase = np.cumsum(f0 * drift) / SR
    n_harm = int(2500 / f0)
    table = np.zeros(4096)
    theta = 2 * np.pi * np.arange(4096) / 4096
    for k in range(1, n_harm + 1):
        table += np.sin(k * theta + rng.uniform(0, 2 * np.pi)) / k**0.7
    pos = (phase % 1.0) * 4096
    x = table[pos.astype(np.int64) % 4096]
    x *= 1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t)
    return unit_rms(unit_rms(x) + 0.1 * coloured_noise(n, 1.0, rng))


def babble(n: int, rng: np.random.Generator, talkers: int = 5) -> np.ndarray:
    """Babble-like bed: talkers of formant-shaped noise, each gated by a syllabic envelope."""
    m = fast_len(n)
    f = np.fft.rfftfreq(m, 1 / SR)
    out = np.zeros(n)
    frame = n_samples(0.02)
    spectra = np.fft.rfft(rng.standard_normal((talkers, m)), axis=1)  # (talkers, m // 2 + 1)
    for spec in spectra:
        shape = np.zeros_like(f)
        for centre, width in ((rng.uniform(300, 900), 150.0), (rng.uniform(1000, 2500), 300.0)):
            shape += np.exp(-0.5 * ((f - centre) / width) ** 2)
        shape += 0.05 * np.exp(-f / 3000)  # weak broadband part
        voice = np.fft.irfft(spec * shape, m)[:n]
        # Syllabic gating: random on/off per 20 ms frame, smoothed to ~4-6 Hz.
        gates = (rng.random(n // frame + 2) < 0.6).astype(float)
        kernel = np.hanning(9)
        env = np.convolve(gates, kernel / kernel.sum(), mode="same")
        env = np.repeat(env, frame)[:n]
        out += unit_rms(voice) * env
    return unit_rms(out)


def band_energies(x: np.ndarray) -> np.ndarray:
    """Energy of x in each third-octave band (100 Hz .. 6.3 kHz); (n_bands,)."""
    m = fast_len(len(x))  # zero-padded; the same length for event and bed keeps ratios fair
    power = np.abs(np.fft.rfft(x, m)) ** 2
    f = np.fft.rfftfreq(m, 1 / SR)
    idx = np.searchsorted(f, BAND_EDGES)  # (n_bands, 2) bin ranges
    csum = np.concatenate([[0.0], np.cumsum(power)])
    return csum[idx[:, 1]] - csum[idx[:, 0]]


def gain_for_snr(event: np.ndarray, bed_segment: np.ndarray, snr_db: float) -> float:
    """Linear gain putting `event` `snr_db` above `bed_segment` in the event's dominant band."""
    e_ev = band_energies(event)
    e_bed = band_energies(bed_segment)
    b = int(np.argmax(e_ev))
    floor = 1e-12 * len(event)  # silent bed: keep the gain finite
    return float(np.sqrt(10 ** (snr_db / 10) * max(e_bed[b], floor) / max(e_ev[b], 1e-20)))
