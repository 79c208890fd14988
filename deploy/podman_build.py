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
"""

from __future__ import annotations

import argparse
import ast
import os
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
    parser.add_argument("extra", nargs="*", help="more `podman build` options, after --")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    python_image = None
    if not args.no_local_base:
        subprocess.run([str(ROOT / "deploy" / "local-images.sh")], env=env, check=True)
        python_image = LOCAL_PYTHON
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
    return rc


if __name__ == "__main__":
    sys.exit(main())
