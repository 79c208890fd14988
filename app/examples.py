"""Example clips the page at `/` offers: `examples.json` plus WAV files in one directory.

The default recipe writes them (training/recipes/examples.py) next to the page, under
app/static/examples/; `QUAVER_EXAMPLES_DIR` points elsewhere. Each entry names its `file`, the
question, choices, correct answer and the recordings' packages and licence. A missing directory
means no examples (the page hides the row); a clip is served only when the listing names it, so
no request can reach another path.
"""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES_FILE = "examples.json"


def list_examples(directory: Path) -> list[dict]:
    """The entries of `<directory>/examples.json` whose file is there ([] when none)."""
    path = Path(directory) / EXAMPLES_FILE
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())
    return [e for e in entries if (Path(directory) / Path(e["file"]).name).is_file()]


def example_file(directory: Path, name: str) -> Path | None:
    """The clip named `name` if the listing has it, else None."""
    for e in list_examples(directory):
        if e["file"] == name:
            return Path(directory) / Path(name).name
    return None
