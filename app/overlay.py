"""Base overlays: the few base-model tensors a posterior was trained on top of, shipped with it.

The embedded default's base (`quaver build-base`, 650 MB) is rebuilt from pinned packages and
never committed, but its projector is new: initialised at assembly (fixed seed). A posterior
fine-tuned on top of it needs exactly that projector. Rather than
ship a second 650 MB checkpoint, or trust every rebuild to draw the same initial weights, the
posterior directory carries those tensors:

    base_overlay.safetensors   fp32 base-model tensors by state-dict name (e.g. the projector's)
    quaver.json  "base": {"path", "config_hash", "recipe_hash", "overlay": {"file", "sha256",
                          "tensors"}}

`apply_overlay` checks the base's build recipe (the `recipe_hash` of its quaver_base.json: the
same pinned packages and assembly code), the file's sha256, each tensor's name, shape and
finiteness, then copies the tensors into the freshly loaded model once, at load time, before any
request is served. A posterior without an overlay leaves the model untouched.

    loaded = load_checkpoint("artifacts/base")
    apply_overlay("app/default", loaded)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from app.posterior import META_FILE, PosteriorError, save_tensors

OVERLAY_FILE = "base_overlay.safetensors"
BASE_INFO_FILE = "quaver_base.json"  # written by `quaver build-base` next to the weights


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_recipe_hash(model_dir: str | Path) -> str | None:
    """The build recipe hash of an assembled base directory (None for other checkpoints)."""
    info = Path(model_dir) / BASE_INFO_FILE
    if not info.exists():
        return None
    try:
        return json.loads(info.read_text()).get("recipe_hash")
    except (json.JSONDecodeError, AttributeError):
        return None


def write_overlay(
    posterior_dir: str | Path,
    model: torch.nn.Module,
    prefixes: tuple[str, ...],
    base_dir: str | Path,
) -> dict:
    """Store `model`'s tensors under `prefixes` in `posterior_dir` and point quaver.json's base at
    `base_dir` (an assembled base with a recipe hash). Returns the new "base" section."""
    out = Path(posterior_dir)
    recipe = base_recipe_hash(base_dir)
    if recipe is None:
        raise PosteriorError(f"{base_dir} has no {BASE_INFO_FILE}: not an assembled base")
    tensors = {
        name: t.detach().to(torch.float32).contiguous().cpu()
        for name, t in model.state_dict().items()
        if name.startswith(prefixes)
    }
    if not tensors:
        raise PosteriorError(f"no tensor of the model starts with {prefixes}")
    save_tensors(tensors, out / OVERLAY_FILE)
    meta = json.loads((out / META_FILE).read_text())
    meta["base"] = {
        **meta.get("base", {}),
        "path": str(base_dir),
        "recipe_hash": recipe,
        "overlay": {
            "file": OVERLAY_FILE,
            "sha256": file_sha256(out / OVERLAY_FILE),
            "tensors": sorted(tensors),
        },
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta["base"]


def apply_overlay(posterior_dir: str | Path, loaded) -> list[str]:
    """Copy the posterior's base overlay (if any) into `loaded.model`; returns the tensor names.

    Raises PosteriorError, before touching the model, when the base was built from another recipe
    or the overlay is missing, modified, or does not fit the model.
    """
    p = Path(posterior_dir)
    try:
        meta = json.loads((p / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PosteriorError(f"cannot read {p / META_FILE}: {exc}") from exc
    base = meta.get("base", {})
    spec = base.get("overlay")
    if not spec:
        return []
    have = base_recipe_hash(loaded.path)
    if have != base.get("recipe_hash"):
        raise PosteriorError(
            f"posterior {p} was trained on a base built by recipe "
            f"{str(base.get('recipe_hash'))[:12]}, but {loaded.path} "
            + ("is not an assembled base" if have is None else f"has recipe {have[:12]}")
            + ": rebuild it with `quaver build-base --force`"
        )
    path = p / spec.get("file", OVERLAY_FILE)
    if not path.exists():
        raise PosteriorError(f"posterior {p} is missing its base overlay {path.name}")
    if file_sha256(path) != spec.get("sha256"):
        raise PosteriorError(f"{path} does not match the sha256 recorded in {META_FILE}")
    tensors = load_file(path)
    if sorted(tensors) != sorted(spec.get("tensors", [])):
        raise PosteriorError(f"{path} holds other tensors than {META_FILE} lists")
    params = loaded.model.state_dict()
    for name, t in tensors.items():
        if name not in params:
            raise PosteriorError(f"overlay tensor {name} is not a tensor of the base model")
        if tuple(t.shape) != tuple(params[name].shape):
            raise PosteriorError(
                f"overlay tensor {name} has shape {tuple(t.shape)}, the base model "
                f"{tuple(params[name].shape)}"
            )
        if not torch.isfinite(t).all():
            raise PosteriorError(f"overlay tensor {name} has NaN or infinite values")
    with torch.no_grad():  # load time only: no request is being served yet
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    return sorted(tensors)
