#!/usr/bin/env bash
# Local base images for an air-gapped container build: made from Debian packages with debootstrap
# and `podman import`, never pulled from an image registry.
#   deploy/local-images.sh            # make what is missing (a second run only checks)
#   deploy/local-images.sh --force    # make both again
#
# The images it makes (podman's local storage, `localhost/` names):
#   localhost/quaver-python:3.11-bookworm      stand-in for python:3.11-slim-bookworm: Debian 12's
#                                              python3 (3.11) with venv, `python` on PATH
#   localhost/quaver-prometheus:bookworm       Debian 12's prometheus package, laid out like the
#                                              official image (entrypoint, user nobody, /prometheus)
# Use them through the knobs the Dockerfile and compose file already have (their defaults are the
# official images, so a machine with a registry needs none of this):
#   podman build --format docker --build-arg PYTHON_IMAGE=localhost/quaver-python:3.11-bookworm .
#   PYTHON_IMAGE=localhost/quaver-python:3.11-bookworm \
#   PROMETHEUS_IMAGE=localhost/quaver-prometheus:bookworm podman-compose up -d app prometheus
# docs/deploy.md ("Without an image registry") has the whole path.
#
# Needs root (debootstrap), podman and debootstrap (bin/setup --system installs both) and the
# Debian package archive (DEBIAN_MIRROR overrides debootstrap's default mirror). Each image carries
# a label with the hash of its recipe; an image made by another version of this script is made
# again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_IMAGE=localhost/quaver-python:3.11-bookworm
PROMETHEUS_IMAGE=localhost/quaver-prometheus:bookworm
SUITE=bookworm
force=0
[[ "${1:-}" == "--force" ]] && force=1

say() { echo "[local-images] $*"; }
die() {
  echo "[local-images] $*" >&2
  exit 1
}

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || die "$tool not found: bin/setup --system installs it"
done

# recipe <name> <packages> <import changes...>: the hash that labels an image made from them
recipe() { printf '%s\n' "$SUITE" "$@" "$(sed -n '/^make_image()/,/^}/p' "$0")" | sha256sum | cut -c1-16; }

have() { # have <image> <recipe hash>: the image exists and was made from this recipe
  [[ $force == 0 ]] || return 1
  podman image exists "$1" || return 1
  [[ "$(podman image inspect --format '{{index .Labels "org.quaver.recipe"}}' "$1")" == "$2" ]]
}

# make_image <image> <packages (comma-separated)> <setup command run in the root fs> <changes...>
make_image() {
  local image=$1 packages=$2 setup=$3 hash tmp
  shift 3
  hash=$(recipe "$image" "$packages" "$setup" "$@")
  if have "$image" "$hash"; then
    say "$image up to date"
    return
  fi
  [[ $(id -u) -eq 0 ]] || die "debootstrap needs root to make $image"
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/quaver-rootfs.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
  trap "rm -rf '$tmp'" EXIT
  say "debootstrap $SUITE + $packages (about a minute)"
  # shellcheck disable=SC2086  # DEBIAN_MIRROR is one word or nothing
  if ! debootstrap --variant=minbase --include="$packages" "$SUITE" "$tmp/root" \
    ${DEBIAN_MIRROR:-} >"$tmp/debootstrap.log" 2>&1; then
    tail -n 20 "$tmp/debootstrap.log" >&2
    die "debootstrap failed (is the Debian package archive reachable?)"
  fi
  chroot "$tmp/root" /bin/sh -ec "$setup"
  # Like the official slim images: no package lists, caches, manuals or translations.
  rm -rf "$tmp/root"/var/lib/apt/lists/* "$tmp/root"/var/cache/apt/* \
    "$tmp/root"/usr/share/doc/* "$tmp/root"/usr/share/man/* "$tmp/root"/usr/share/locale/* \
    "$tmp/root"/var/log/* "$tmp/root"/tmp/*
  local args=(--change "LABEL org.quaver.recipe=$hash")
  for change in "$@"; do args+=(--change "$change"); done
  tar -C "$tmp/root" -cf - . | podman import --quiet "${args[@]}" - "$image" >/dev/null
  rm -rf "$tmp"
  trap - EXIT
  say "$image made ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec))"
}

make_image "$PYTHON_IMAGE" python3,python3-venv,python-is-python3,ca-certificates \
  'python3 --version' \
  'ENV LANG=C.UTF-8' \
  'CMD ["python3"]' \
  "LABEL org.quaver.stand-in-for=python:3.11-slim-bookworm"

# The official image's layout: entrypoint /bin/prometheus (Debian 12 merges /bin into /usr/bin),
# user nobody, data in /prometheus.
make_image "$PROMETHEUS_IMAGE" prometheus \
  'mkdir -p /prometheus && chown nobody:nogroup /prometheus
   rm -f /etc/prometheus/prometheus.yml
   prometheus --version 2>&1 | head -n1' \
  'ENTRYPOINT ["/bin/prometheus"]' \
  'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
  'USER nobody' \
  'WORKDIR /prometheus' \
  'EXPOSE 9090' \
  'VOLUME ["/prometheus"]' \
  "LABEL org.quaver.stand-in-for=prom/prometheus"

say "ready: $PYTHON_IMAGE, $PROMETHEUS_IMAGE"
