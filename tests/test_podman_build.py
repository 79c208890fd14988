"""deploy/podman_build.py without podman: which images its cleanup removes, and the full-disk stop.

A stand-in `podman` on PATH (a small script that logs its arguments and answers `images` and
`info` from files) takes the place of the real one; tests/test_container.py runs the real build.

    python -m pytest tests/test_podman_build.py -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("podman_build", ROOT / "deploy/podman_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


podman_build = _load()

FAKE_PODMAN = """#!{python}
import json, sys
from pathlib import Path
here = Path(__file__).parent
with open(here / "calls.jsonl", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[0] == "info":
    print(here / "storage")
elif args[0] == "images":
    rounds = json.loads((here / "images.json").read_text())
    print(json.dumps(rounds.pop(0) if rounds else []))
    (here / "images.json").write_text(json.dumps(rounds))
"""


@pytest.fixture
def fake_podman(tmp_path, monkeypatch):
    """A directory with the stand-in `podman` first on PATH; returns (dir, calls())."""
    script = tmp_path / "podman"
    script.write_text(FAKE_PODMAN.format(python=sys.executable))
    script.chmod(0o755)
    (tmp_path / "storage").mkdir()
    (tmp_path / "images.json").write_text("[]")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def calls() -> list[list[str]]:
        log = tmp_path / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return tmp_path, calls


def _row(image_id: str, created: int) -> dict:
    return {"Id": image_id, "Created": created, "Labels": {podman_build.BASE_LABEL: "python"}}


def test_stale_images_keeps_only_the_newest():
    rows = [_row("old-runtime", 100), _row("new-build-stage", 300), _row("old-build-stage", 50)]
    assert podman_build.stale_images(rows) == ["old-runtime", "old-build-stage"]
    assert podman_build.stale_images([_row("only", 1)]) == []
    assert podman_build.stale_images([]) == []


def test_cleanup_removes_stale_images_until_none_is_left(fake_podman):
    """Round 1: two stale images go; round 2: the cache parent they left dangling goes; round
    3: only the newest build stage is dangling, so the cleanup stops."""
    where, calls = fake_podman
    rounds = [
        [_row("a", 100), _row("b", 200), _row("newest", 300)],
        [_row("parent-of-a", 90), _row("newest", 300)],
        [_row("newest", 300)],
    ]
    (where / "images.json").write_text(json.dumps(rounds))
    podman_build.remove_stale_images(dict(os.environ))
    removed = [c[1:] for c in calls() if c[0] == "rmi"]
    assert removed == [["b", "a"], ["parent-of-a"]]
    listed = [c for c in calls() if c[0] == "images"]
    assert len(listed) == 3
    assert all(f"label={podman_build.BASE_LABEL}" in c and "dangling=true" in c for c in listed)


def test_full_disk_stops_before_building(fake_podman, monkeypatch, capsys):
    _, calls = fake_podman
    monkeypatch.setattr(podman_build, "MIN_FREE_GB", 1e12)  # more than any disk has
    rc = podman_build.main(["--no-local-base", "--no-host-pip"])
    assert rc == podman_build.EXIT_NO_SPACE
    assert "not enough disk" in capsys.readouterr().err
    assert not any(c[0] == "build" for c in calls())


def test_keep_stale_removes_nothing(fake_podman, monkeypatch):
    where, calls = fake_podman
    (where / "images.json").write_text(json.dumps([[_row("a", 1), _row("b", 2)]]))
    monkeypatch.setattr(podman_build, "MIN_FREE_GB", 1e12)
    assert podman_build.main(["--no-local-base", "--no-host-pip", "--keep-stale"]) == 3
    assert not any(c[0] in ("rmi", "images") for c in calls())
