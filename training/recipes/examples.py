"""Example clips for the web page at `/`: a few `test` items of the default's benchmark, copied
with their question, choices, correct answer and provenance into app/static/examples/.

    from training.recipes.examples import write_examples
    write_examples(Path("work/default/data/bench"), Path("app/static/examples"))

Run by the default recipe's ship step (training/recipes/default.py). The clips come from the
`test` split, whose recordings are drawn from the training-side packages (tuxpaint-stamps-default,
timgm6mb-soundfont, espeak-ng), never from the held-out ones kept for `test_real`. Each family's
first answerable item is taken, whatever the shipped model answers on it: the page shows the
correct answer next to the model's, so a visitor sees misses as well as hits.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from training.data.manifest import Item, read_manifest
from training.data.sources import PACKAGES

EXAMPLES_FILE = "examples.json"
# (family, whether the clip must be purely synthetic: no recording in it, not even the bed)
EXAMPLE_FAMILIES: tuple[tuple[str, bool], ...] = (
    ("loudness", True),
    ("sound_class", False),
    ("spoken_number", False),
    ("count_real", False),
)
HELD_OUT = frozenset(name for name, p in PACKAGES.items() if p.side == "heldout")


def _entry(item: Item, file: str) -> dict:
    packages = [p for p in re.split(r"[|,]", str(item.difficulty.get("packages", ""))) if p]
    if HELD_OUT.intersection(packages):
        raise ValueError(f"{item.id} holds a held-out package's recording: {packages}")
    return {
        "file": file,
        "family": item.family,
        "kind": "real recording" if packages else "synthetic",
        "question": item.question,
        "choices": list(item.choices),
        "answer": item.choices[item.answer_index],
        "item": item.id,
        "recordings": str(item.difficulty.get("recordings", "")),
        "packages": packages,
        "licence": "; ".join(f"{p}: {PACKAGES[p].licence}" for p in packages) or "Apache-2.0",
    }


def pick_examples(items: list[Item], families=EXAMPLE_FAMILIES) -> list[Item]:
    """The first answerable item of each family (synthetic-only where asked), in `families`
    order; a family with no such item raises."""
    out = []
    for family, synthetic in families:
        for item in items:
            if item.family == family and not (synthetic and item.difficulty.get("packages")):
                out.append(item)
                break
        else:
            raise ValueError(f"no {'synthetic ' if synthetic else ''}{family!r} item to show")
    return out


def write_examples(data_dir: Path, out_dir: Path, families=EXAMPLE_FAMILIES) -> list[dict]:
    """Copy the picked `test` clips to `<out_dir>/<family>.wav` and list them in examples.json
    (replacing an earlier set); returns the entries."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = []
    for item in pick_examples(read_manifest(data_dir, "test"), families):
        file = f"{item.family}.wav"
        shutil.copyfile(data_dir / item.audio, tmp / file)
        entries.append(_entry(item, file))
    (tmp / EXAMPLES_FILE).write_text(json.dumps(entries, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return entries
