"""Build Quaver's image with podman where no image registry is reachable.

The repository's Dockerfile, unchanged, on the local Python stand-in that deploy/local-images.sh
makes from Debian packages, with this host's pip configuration lent to the build: a pip.conf
written from `pip config list` is mounted at /etc/pip.conf of every RUN step, and each local path
it names (find-links directories such as the one holding the CPU torch wheel, file:// indexes,
the constraint file, the CA bundle) is mounted read-only at the same path. Mounts are not part of
any layer: the image is the one a normal build makes, only its packages came the host's way.

    python deploy/podman_build.py                   # -> localhost/quaver:cpu
    python deploy/podman_build.py --tag quaver:dev --no-local-base -- --no-cache

Runs deploy/local-images.sh first (it only checks when the images exist), and podman with
deploy/podman/containers.conf unless CONTAINERS_CONF is set. Prints the build time.

Disk: podman keeps what every build leaves behind, and on a machine that builds once per change
(CI) that filled the disk (214 images, 379 GB, before this cleanup existed). So before and after
each build this removes the stale images of earlier builds on the local bases: the runtime images
a newer build took the tag from, and all build stages but the newest, which holds the layer cache
(torch, the weight packages) the next build reuses. With less than MIN_FREE_GB free in podman's
storage after that, it stops before building, exit status 3 (EXIT_NO_SPACE), saying so.
`--keep-stale` leaves every image in place.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PYTHON = "localhost/quaver-python:3.11-bookworm"
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
# pip options that name local files or directories (values may hold several, space-separated).
PATH_OPTIONS = {"find-links", "extra-index-url", "index-url", "cert", "client-cert", "constraint"}
# deploy/local-images.sh labels its base images so; every image built on them inherits it.
BASE_LABEL = "org.quaver.stand-in-for"
# A build writes about 2.5 GB of new layers and the 0.7 GB base model; headroom on top.
MIN_FREE_GB = 6.0
EXIT_NO_SPACE = 3


def host_pip_config(python: str = sys.executable) -> dict[str, str]:
    """{option: value} of pip's effective configuration on this host (files and PIP_* variables,
    the environment winning), as `pip config list` prints it."""
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, option = key.rpartition(".")
        value = ast.literal_eval(value)
        (env if section == ":env:" else files)[option] = value
    return files | env


def local_paths(config: dict[str, str]) -> list[Path]:
    """The existing local paths the options of `config` name (file:// URLs as paths). A local
    index's `simple/` pages link to files beside it (../../files/...): its parent goes instead."""
    paths = set()
    for option, value in config.items():
        if option not in PATH_OPTIONS:
            continue
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if not (path.is_absolute() and path.exists()):
                continue
            paths.add(path.parent if path.name == "simple" and "index" in option else path)
    return sorted(paths)


def pip_conf(config: dict[str, str]) -> str:
    """An INI pip.conf carrying `config` in its [global] section."""
    lines = ["[global]"] + [f"{k} = {v}" for k, v in sorted(config.items())]
    return "\n".join(lines) + "\n"


def build_command(
    tag: str,
    variant: str,
    python_image: str | None,
    conf_file: Path | None,
    mounts: list[Path],
    extra: list[str],
) -> list[str]:
    """The `podman build` command line. Docker format: an OCI image drops the HEALTHCHECK.
    TORCH_VARIANT always given: podman 4.3 (buildah 1.28) resolves `FROM runtime-${TORCH_VARIANT}`
    to the stage only for a build argument passed on the command line, not for its default."""
    cmd = ["podman", "build", "--format", "docker", "--tag", tag, "--file", "Dockerfile"]
    cmd += ["--build-arg", f"TORCH_VARIANT={variant}"]
    if python_image:
        cmd += ["--build-arg", f"PYTHON_IMAGE={python_image}"]
    if conf_file is not None:
        cmd += ["--volume", f"{conf_file}:/etc/pip.conf:ro"]
    for path in mounts:
        cmd += ["--volume", f"{path}:{path}:ro"]
    return [*cmd, *extra, "."]


def podman_json(env: dict[str, str], *args: str):
    """What `podman ARGS --format json` prints, parsed."""
    out = subprocess.run(
        ["podman", *args, "--format", "json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out or "null")


def stale_images(images: list[dict]) -> list[str]:
    """IDs of the stale images among `images` (`podman images --filter dangling=true --format
    json` rows, those on the local bases): all but the newest. Earlier builds' runtime images and
    build stages become dangling when a newer build takes the tag; the newest dangling image is
    the last build's build stage, whose layers are the cache the next build starts from."""
    ordered = sorted(images, key=lambda row: row["Created"], reverse=True)
    return [row["Id"] for row in ordered[1:]]


def remove_stale_images(env: dict[str, str], rounds: int = 5) -> None:
    """Remove the stale images of earlier builds (stale_images); print what that freed. Removing
    an image can leave its cache parents dangling in turn, so this repeats (at most `rounds`
    times). An image a container still uses stays (podman refuses; reported, not fatal)."""
    root = storage_root(env)
    before = shutil.disk_usage(root).free
    removed = 0
    for _ in range(rounds):
        rows = podman_json(
            env, "images", "--filter", "dangling=true", "--filter", f"label={BASE_LABEL}"
        )
        stale = stale_images(rows or [])
        if not stale:
            break
        done = subprocess.run(["podman", "rmi", *stale], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"[podman-build] some stale images stay: {done.stderr.strip()}", flush=True)
            break
        removed += len(stale)
    if removed:
        freed = (shutil.disk_usage(root).free - before) / 1e9
        print(f"[podman-build] removed {removed} stale images, {freed:.1f} GB freed", flush=True)


def storage_root(env: dict[str, str]) -> str:
    """The directory podman keeps its images in (its graph root)."""
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Store.GraphRoot}}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return info.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="quaver:cpu", help="image name (default quaver:cpu)")
    parser.add_argument("--variant", choices=("cpu", "cuda"), default="cpu", help="TORCH_VARIANT")
    parser.add_argument(
        "--no-local-base",
        action="store_true",
        help="build on the Dockerfile's default Python image (needs a registry)",
    )
    parser.add_argument(
        "--no-host-pip", action="store_true", help="leave the host's pip configuration out"
    )
    parser.add_argument(
        "--keep-stale",
        action="store_true",
        help="keep earlier builds' images (by default removed before and after the build)",
    )
    parser.add_argument("extra", nargs="*", help="more `podman build` options, after --")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    python_image = None
    if not args.no_local_base:
        subprocess.run([str(ROOT / "deploy" / "local-images.sh")], env=env, check=True)
        python_image = LOCAL_PYTHON
    if not args.keep_stale:
        remove_stale_images(env)
    root = storage_root(env)
    free_gb = shutil.disk_usage(root).free / 1e9
    if free_gb < MIN_FREE_GB:
        print(
            f"[podman-build] not enough disk: {free_gb:.1f} GB free in {root}, a build needs about"
            f" {MIN_FREE_GB:.0f} GB; `podman image prune` frees the images no tagged image uses",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_NO_SPACE
    with tempfile.TemporaryDirectory(prefix="quaver-build-") as tmp:
        conf_file, mounts = None, []
        if not args.no_host_pip:
            config = host_pip_config()
            conf_file = Path(tmp) / "pip.conf"
            conf_file.write_text(pip_conf(config))
            mounts = local_paths(config)
        cmd = build_command(args.tag, args.variant, python_image, conf_file, mounts, args.extra)
        print("[podman-build]", " ".join(cmd), flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc == 0:
        print(f"[podman-build] {args.tag} built in {time.monotonic() - t0:.0f} s", flush=True)
        if not args.keep_stale:
            remove_stale_images(env)
    return rc


if __name__ == "__main__":
    sys.exit(main())
