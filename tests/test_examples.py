"""The page's example clips: the shipped set (training-side recordings only, answer among the
choices), the routes that list and serve them, and the picking rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from app.examples import EXAMPLES_FILE
from app.server import create_app
from app.settings import DEFAULT_EXAMPLES_DIR, Settings
from training.data.manifest import Item
from training.data.sources import PACKAGES
from training.recipes.examples import EXAMPLE_FAMILIES, _entry, pick_examples


def _item(i: int, family: str, packages: str = "") -> Item:
    diff = {"packages": packages, "recordings": f"{packages}:x.ogg"} if packages else {}
    return Item(f"test-{i}", f"audio/test/{i}.wav", "q?", ("a", "b"), 1, family, "test", 2.0, diff)


def test_shipped_examples_come_from_training_side_packages() -> None:
    entries = json.loads((DEFAULT_EXAMPLES_DIR / EXAMPLES_FILE).read_text())
    assert [e["family"] for e in entries] == [f for f, _ in EXAMPLE_FAMILIES]
    kinds = {e["kind"] for e in entries}
    assert kinds == {"synthetic", "real recording"}
    for e in entries:
        assert e["answer"] in e["choices"] and 2 <= len(e["choices"]) <= 4
        for pkg in e["packages"]:
            assert PACKAGES[pkg].side == "train", (e["file"], pkg)
            assert pkg in e["licence"]
        info = sf.info(DEFAULT_EXAMPLES_DIR / e["file"])
        assert info.samplerate == 16000 and 1.0 <= info.duration <= 10.0


def test_pick_examples_rules() -> None:
    items = [
        _item(0, "loudness", "tuxpaint-stamps-default"),  # has a real bed: not synthetic
        _item(1, "control"),
        _item(2, "loudness"),
        _item(3, "sound_class", "tuxpaint-stamps-default"),
    ]
    picked = pick_examples(items, (("loudness", True), ("sound_class", False)))
    assert [i.id for i in picked] == ["test-2", "test-3"]
    with pytest.raises(ValueError, match="no 'count_real' item"):
        pick_examples(items, (("count_real", False),))
    with pytest.raises(ValueError, match="held-out"):
        _entry(_item(4, "sound_class", "tuxpaint-stamps-default|openttd-opensfx"), "x.wav")


def test_routes_list_and_serve_clips(tiny_dir, posterior_dir, tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF-not-really")
    (tmp_path / "secret.txt").write_text("no")
    listing = [{"file": "a.wav", "family": "loudness"}, {"file": "gone.wav", "family": "count"}]
    (tmp_path / EXAMPLES_FILE).write_text(json.dumps(listing))
    settings = Settings(model_dir=tiny_dir, posterior_dir=posterior_dir, examples_dir=tmp_path)
    with TestClient(create_app(settings, load_in_background=False)) as c:
        listed = c.get("/examples").json()["examples"]
        assert [e["file"] for e in listed] == ["a.wav"]  # an entry whose file is gone is dropped
        r = c.get("/examples/a.wav")
        assert r.status_code == 200 and r.content == b"RIFF-not-really"
        assert r.headers["content-type"] == "audio/wav"
        for name in ("secret.txt", "gone.wav", "..%2Fexamples.json"):
            r = c.get(f"/examples/{name}")
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", name
    empty = Settings(model_dir=tiny_dir, posterior_dir=posterior_dir, examples_dir=tmp_path / "x")
    with TestClient(create_app(empty, load_in_background=False)) as c:
        assert c.get("/examples").json() == {"examples": []}
