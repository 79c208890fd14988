"""The web API: contract, every bad input, concurrency, metrics, readiness, API key."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.server import create_app, load_predictor
from app.settings import Settings
from app.thresholds import FALLBACK_RISK, default_risk
from tests.conftest import tone, wav_bytes

QUESTION = "How many beeps are there?"
CHOICES = ["one", "two", "three"]


@pytest.fixture(scope="module")
def settings(tiny_dir, posterior_dir):
    return Settings(
        model_dir=tiny_dir,
        posterior_dir=posterior_dir,
        max_upload_bytes=400_000,
        max_samples=16,
        default_samples=4,
        adaptive=False,
    )


@pytest.fixture(scope="module")
def client(settings):
    app = create_app(settings, load_in_background=False)
    with TestClient(app) as c:
        yield c


def post(client, audio=None, data=None, filename="clip.wav", ctype="audio/wav", **kw):
    audio = wav_bytes(tone(1.5)) if audio is None else audio
    form = {"question": QUESTION, "choices": CHOICES}
    form.update(data or {})
    form = {k: v for k, v in form.items() if v is not None}
    return client.post("/answer", files={"audio": (filename, audio, ctype)}, data=form, **kw)


def test_answer_contract(client):
    r = post(client, data={"samples": "4", "max_risk": "0.1", "seed": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] in CHOICES and body["answer"] == CHOICES[body["answer_index"]]
    assert set(body["probabilities"]) == set(CHOICES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    assert body["threshold"] == 0.6 and body["max_risk"] == 0.1
    assert body["abstain"] == (body["confidence"] < 0.6)
    assert body["samples"] == 4
    assert set(body["uncertainty"]) == {"entropy", "mutual_information", "agreement", "no_answer"}
    assert body["uncertainty"]["no_answer"] is None  # this posterior has no control probe
    assert body["model"]["posterior"] == "test-posterior"
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] > 0
    again = post(client, data={"samples": "4", "max_risk": "0.1", "seed": "3"}).json()
    assert again["probabilities"] == body["probabilities"]


def test_formats_rates_and_channels(client):
    for fmt, rate, channels, ctype in (
        ("FLAC", 44100, 2, "audio/flac"),
        ("OGG", 22050, 1, "audio/ogg"),
        ("WAV", 8000, 3, "audio/x-wav"),
    ):
        audio = wav_bytes(tone(1.0, rate=rate), rate=rate, fmt=fmt, channels=channels)
        r = post(client, audio=audio, ctype=ctype, filename=f"clip.{fmt.lower()}")
        assert r.status_code == 200, (fmt, r.text)


def test_default_risk_is_the_lowest_guaranteed_with_coverage(client, settings, posterior_dir):
    # the test posterior guarantees 0.05, 0.1, 0.2, 0.5 and not 0.01; 0.05 answers 30 % of calib
    r = post(client).json()
    assert r["max_risk"] == 0.05 and r["threshold"] == 0.9
    assert r["lowest_guaranteed_risk"] == 0.05
    info = client.get("/model").json()
    assert info["default_max_risk"] == 0.05 and info["lowest_guaranteed_risk"] == 0.05
    assert [t["max_risk"] for t in info["targets"]] == [0.01, 0.05, 0.1, 0.2, 0.5]
    assert [t["feasible"] for t in info["targets"]] == [False, True, True, True, True]
    assert info["targets"][0]["threshold"] is None and info["targets"][1]["coverage"] == 0.3
    # a configured default wins
    fixed = settings.model_copy(update={"default_max_risk": 0.2})
    with TestClient(create_app(fixed, load_in_background=False)) as c:
        r = post(c).json()
        assert r["max_risk"] == 0.2 and r["threshold"] == 0.4
        assert c.get("/model").json()["default_max_risk"] == 0.2
    # a coverage floor of 50 % moves the default to 0.1, the first target answering 60 %
    wider = settings.model_copy(update={"default_min_coverage": 0.5})
    with TestClient(create_app(wider, load_in_background=False)) as c:
        r = post(c).json()
        assert r["max_risk"] == 0.1 and r["threshold"] == 0.6
        assert c.get("/model").json()["default_max_risk"] == 0.1


def test_default_risk_rule():
    def table(*rows):
        return {
            "targets": [
                {"max_risk": r, "threshold": t, "coverage": c, "feasible": t is not None}
                for r, t, c in rows
            ]
        }

    shipped = table((0.05, None, 0.0), (0.1, 0.87, 0.1275), (0.2, 0.63, 0.375))
    assert default_risk(shipped, None) == 0.2  # 0.1 answers 12.75 % of calib: below 30 %
    assert default_risk(shipped, None, min_coverage=0.1) == 0.1
    assert default_risk(shipped, None, min_coverage=0.0) == 0.1  # the lowest guaranteed
    assert default_risk(shipped, 0.05) == 0.05  # a configured default wins
    # no guaranteed target reaches the floor: the one answering most
    assert default_risk(shipped, None, min_coverage=0.9) == 0.2
    # no coverage recorded: the lowest guaranteed target
    assert default_risk(table((0.1, 0.8, None), (0.2, 0.6, None)), None) == 0.1
    # nothing guaranteed, or no table: the fallback
    assert default_risk(table((0.1, None, 0.0)), None) == FALLBACK_RISK
    assert default_risk(None, None) == FALLBACK_RISK


def test_always_abstain_and_always_answer_targets(client):
    r = post(client, data={"max_risk": "0.01"}).json()
    assert r["abstain"] is True and r["threshold"] is None
    assert r["lowest_guaranteed_risk"] == 0.05  # what to ask for instead
    r = post(client, data={"max_risk": "0.5"}).json()
    assert r["abstain"] is False and r["threshold"] == 0.0


BAD = [
    ("empty file", dict(audio=b""), 422, "invalid_input"),
    ("corrupt file", dict(audio=b"RIFF\x00\x00garbage" * 50), 415, "unsupported_media_type"),
    ("not audio type", dict(ctype="text/plain"), 415, "unsupported_media_type"),
    ("too long", dict(audio=wav_bytes(tone(11.0), rate=8000)), 413, "audio_too_long"),
    ("missing question", dict(data={"question": None}), 422, "invalid_input"),
    ("empty question", dict(data={"question": "   "}), 422, "invalid_input"),
    ("one choice", dict(data={"choices": ["one"]}), 422, "invalid_input"),
    ("duplicate choices", dict(data={"choices": ["one", "One"]}), 422, "invalid_input"),
    ("eleven choices", dict(data={"choices": [f"c{i}" for i in range(11)]}), 422, "limit_exceeded"),
    ("samples zero", dict(data={"samples": "0"}), 422, "invalid_input"),
    ("samples too many", dict(data={"samples": "17"}), 422, "invalid_input"),
    ("samples not int", dict(data={"samples": "many"}), 422, "invalid_input"),
    ("risk out of range", dict(data={"max_risk": "1.5"}), 422, "invalid_input"),
    ("negative seed", dict(data={"seed": "-1"}), 422, "invalid_input"),
]


@pytest.mark.parametrize(("name", "kw", "status", "etype"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_get_clear_errors_and_server_stays_healthy(client, name, kw, status, etype):
    r = post(client, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == etype and err["message"]
    assert client.get("/healthz").status_code == 200
    assert post(client).status_code == 200


def test_a_field_given_twice_is_refused(client):
    wav = wav_bytes(tone(1.0))
    files = [("audio", ("a.wav", wav, "audio/wav")), ("audio", ("b.wav", wav, "audio/wav"))]
    r = client.post("/answer", files=files, data={"question": QUESTION, "choices": CHOICES})
    assert r.status_code == 422 and "audio once" in r.json()["error"]["message"]
    r = post(client, data={"question": [QUESTION, "Which is louder?"]})
    assert r.status_code == 422 and "question once" in r.json()["error"]["message"]


def test_nan_samples_are_rejected(client):
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.full(8000, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
    r = post(client, audio=buf.getvalue())
    assert r.status_code == 422 and "NaN" in r.json()["error"]["message"]


def test_upload_limit_while_streaming(client):
    big = b"\x00" * 500_000
    r = post(client, audio=big)  # declared Content-Length over the limit
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks():  # no Content-Length: rejected while streaming
        yield (
            b'--zz\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n"
        )
        for _ in range(100):
            yield b"x" * 10_000

    r = client.post(
        "/answer", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert r.status_code == 413
    assert post(client).status_code == 200


def test_concurrent_requests_all_answered_and_deterministic(client):
    def one(i):
        return post(client, data={"samples": "4", "seed": str(i % 4)})

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert all(r.status_code == 200 for r in results), [
        r.text for r in results if r.status_code != 200
    ]
    by_seed = {}
    for i, r in enumerate(results):
        by_seed.setdefault(i % 4, []).append(r.json()["probabilities"])
    for probs in by_seed.values():
        for p in probs[1:]:
            assert p == pytest.approx(probs[0], abs=1e-5)
    metrics = client.get("/metrics").text
    assert "quaver_batch_size_count" in metrics


def _metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move(client):
    before = client.get("/metrics").text
    post(client, data={"max_risk": "0.01"})
    post(client, data={"max_risk": "0.5"})
    post(client, audio=b"")
    after = client.get("/metrics").text
    assert _metric(after, "quaver_answers_total", outcome="abstained") > _metric(
        before, "quaver_answers_total", outcome="abstained"
    )
    assert (
        _metric(after, "quaver_answers_total", outcome="answered", max_risk="0.5")
        == _metric(before, "quaver_answers_total", outcome="answered", max_risk="0.5") + 1
    )
    assert _metric(after, "quaver_errors_total", type="invalid_input") > _metric(
        before, "quaver_errors_total", type="invalid_input"
    )
    assert _metric(after, "quaver_requests_total", route="/answer", status="200") >= 2
    assert _metric(after, "quaver_ready") == 1
    assert "quaver_model_info{" in after


def test_readyz_false_until_warm_up(settings):
    gate = threading.Event()

    def slow_loader(s):
        gate.wait(30)
        return load_predictor(s)

    app = create_app(settings, loader=slow_loader)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = post(c)
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        gate.set()
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert c.get("/readyz").status_code == 200
        assert post(c).status_code == 200


def test_failed_load_is_reported(settings, tmp_path):
    bad = settings.model_copy(update={"posterior_dir": tmp_path / "missing"})
    with TestClient(create_app(bad, load_in_background=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "does not exist" in r.json()["error"]
        assert c.get("/healthz").status_code == 200


def test_api_key(settings):
    keyed = settings.model_copy(update={"api_key": "s3cret"})
    with TestClient(create_app(keyed, load_in_background=False)) as c:
        assert post(c).status_code == 401
        assert post(c, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_queue_full_gives_503_with_retry_after(settings):
    small = settings.model_copy(update={"queue_size": 1, "max_batch_rows": 1})
    with TestClient(create_app(small, load_in_background=False)) as c:
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda i: post(c, data={"samples": "16"}), range(24)))
        codes = {r.status_code for r in results}
        assert 200 in codes and 503 in codes
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["Retry-After"] and busy.json()["error"]["type"] == "overloaded"
        assert post(c).status_code == 200


def test_index_page_and_openapi(client):
    assert "Quaver" in client.get("/").text
    spec = client.get("/openapi.json").json()
    assert "/answer" in spec["paths"]


def test_timeout_gives_503_and_the_engine_keeps_serving(settings):
    hurried = settings.model_copy(update={"request_timeout_s": 0.001})
    with TestClient(create_app(hurried, load_in_background=False)) as c:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: post(c, data={"samples": "16"}), range(8)))
        timed_out = [r for r in results if r.status_code == 503]
        assert timed_out and timed_out[0].json()["error"]["type"] == "timeout"
        c.app.state.quaver.settings.request_timeout_s = 60.0
        assert post(c).status_code == 200  # the worker survived the cancelled jobs
