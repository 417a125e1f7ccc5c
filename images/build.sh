#!/usr/bin/env bash
# `make images`: builds kubetune's trainer and operator images into OCI archives with no Docker
# daemon and no registry, from a Debian bookworm base made here with mmdebstrap:
#   images/build.sh [trainer|operator ...]      (default: both)
#   images/build.sh --check-reproducible NAME   rebuild NAME without the layer cache and
#                                               compare image IDs (exit 1 if they differ)
# Output: dist/images/<name>.oci.tar (named ghcr.io/kubetune/<name>:<version>) and dist/images/<name>.id
# (the image ID, which test harnesses use to skip re-importing an unchanged image).
#
# Caching: buildah's storage lives in ~/.cache/kubetune/buildah ($KUBETUNE_IMAGE_CACHE), so its
# layer cache survives between runs: an unchanged image rebuilds in seconds, a source change
# rebuilds one small layer. The base is rebuilt only when its package list changes (the tag
# carries a hash of this script's base section). Reproducible: file and image times are fixed
# (--timestamp 0, SOURCE_DATE_EPOCH), so the same inputs give the same image ID.
# Needs: buildah, mmdebstrap (Debian packages), run as root (buildah --isolation chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
check=
if [[ "${1:-}" == --check-reproducible ]]; then
  check=${2:?usage: build.sh --check-reproducible trainer|operator}
  set -- "$check"
fi
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(trainer operator)
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' src/kubetune/__init__.py)
cache=${KUBETUNE_IMAGE_CACHE:-$HOME/.cache/kubetune/buildah}
out=dist/images
archives=${KUBETUNE_ARCHIVE_CACHE:-$HOME/.cache/kubetune/images}
# The name the operator and the chart use by default, so an imported archive needs no retag.
registry=ghcr.io/kubetune
bah=(buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver overlay)
for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "images: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
mkdir -p "$cache" "$out" "$archives"
stage_start=$SECONDS
stage() { echo "images: $1 in $((SECONDS - stage_start)) s"; stage_start=$SECONDS; }

# --- base: Debian bookworm with its Python 3.11, nothing else --------------------------------
base_packages=python3,python3-venv,ca-certificates
mirror=http://deb.debian.org/debian
base_tag="localhost/kubetune-base:bookworm-$(echo "$base_packages $mirror v1" | sha256sum | cut -c1-12)"
if ! "${bah[@]}" inspect --type image "$base_tag" >/dev/null 2>&1; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  SOURCE_DATE_EPOCH=0 mmdebstrap --quiet --variant=minbase --include="$base_packages" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$work/rootfs.tar" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/usr/bin/python3"]\n' >"$work/Dockerfile"
  "${bah[@]}" build --quiet --isolation chroot --timestamp 0 -t "$base_tag" "$work" >/dev/null
  rm -rf "$work"
  trap - EXIT
  stage "built base $base_tag"
fi

# --- the images ------------------------------------------------------------------------------
secret=()
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[[ -s "$ca" ]] && secret=(--secret "id=build-ca,src=$ca")
for name in "${names[@]}"; do
  tag="localhost/kubetune/$name:$version"
  "${bah[@]}" build --quiet --isolation chroot --layers --pull=never --timestamp 0 \
    --build-arg "BASE_IMAGE=$base_tag" "${secret[@]}" \
    --target "$name" -f images/Dockerfile -t "$tag" . >/dev/null
  id=$("${bah[@]}" inspect --type image --format '{{.FromImageID}}' "$tag")
  stage "built $tag (image ID ${id:0:12})"
  # The newest archive of each image is kept by image ID, so a fresh clone of the same source
  # links it instead of writing 3.5 GB again; older archives of the name are removed.
  archive="$archives/$name-${id:0:16}.oci.tar"
  if [[ ! -s "$archive" ]]; then
    rm -f "$archives/.$name.tmp"
    "${bah[@]}" push --quiet "$tag" "oci-archive:$archives/.$name.tmp:$registry/$name:$version"
    find "$archives" -maxdepth 1 -name "$name-*.oci.tar" -delete
    mv "$archives/.$name.tmp" "$archive"
    stage "wrote $archive ($(du -m "$archive" | cut -f1) MiB)"
  fi
  if [[ ! "$archive" -ef "$out/$name.oci.tar" ]]; then
    ln -f "$archive" "$out/.$name.oci.tar" 2>/dev/null || cp "$archive" "$out/.$name.oci.tar"
    mv -f "$out/.$name.oci.tar" "$out/$name.oci.tar"
  fi
  echo "$id" >"$out/$name.id"
done

# Images no tag and no later step uses any more (earlier builds of these tags): a trainer
# image is 6 GB, and the layer cache of the current builds stays.
"${bah[@]}" rmi --prune >/dev/null 2>&1 || true

if [[ -n "$check" ]]; then
  first=$(cat "$out/$check.id")
  "${bah[@]}" build --quiet --isolation chroot --layers --no-cache --pull=never --timestamp 0 \
    --build-arg "BASE_IMAGE=$base_tag" "${secret[@]}" \
    --target "$check" -f images/Dockerfile -t "localhost/kubetune/$check:reproducible-check" . >/dev/null
  second=$("${bah[@]}" inspect --type image --format '{{.FromImageID}}' "localhost/kubetune/$check:reproducible-check")
  "${bah[@]}" rmi "localhost/kubetune/$check:reproducible-check" >/dev/null
  stage "rebuilt $check without cache"
  echo "images: $check image ID cached build $first, clean rebuild $second"
  [[ "$first" == "$second" ]] || { echo "images: $check is not reproducible" >&2; exit 1; }
fi
