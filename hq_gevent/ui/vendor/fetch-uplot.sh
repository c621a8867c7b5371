#!/bin/sh
# Re-creates hq_gevent/ui/vendor/uplot/ from the npm registry: uPlot (MIT, no dependencies), the
# charting library of the dashboard. Pinned by version and by the tarball's sha256, so a run
# either reproduces the committed files byte for byte or fails. The files are committed and ship
# in the package: users never run this (no build step, no CDN); a maintainer runs it to upgrade.
#
# Upgrade: set VERSION, run with SHA256= (empty) to print the new checksum, check it against
# `npm view uplot@<version> dist.integrity` (sha512 of the same tarball), then pin it here.
set -eu

VERSION=1.6.32
SHA256=${SHA256-4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d}
TARBALL=https://registry.npmjs.org/uplot/-/uplot-$VERSION.tgz

here=$(cd "$(dirname "$0")" && pwd)
dest=$here/uplot
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

curl -fsSL --proto '=https' -o "$tmp/uplot.tgz" "$TARBALL"
actual=$(sha256sum "$tmp/uplot.tgz" | cut -d' ' -f1)
if [ "$actual" != "$SHA256" ]; then
    echo "uplot-$VERSION.tgz: sha256 $actual, expected ${SHA256:-(none pinned)}" >&2
    exit 1
fi
tar -xzf "$tmp/uplot.tgz" -C "$tmp" package/LICENSE package/dist/uPlot.iife.min.js package/dist/uPlot.min.css

mkdir -p "$dest"
cp "$tmp/package/dist/uPlot.iife.min.js" "$tmp/package/dist/uPlot.min.css" "$tmp/package/LICENSE" "$dest/"
echo "$VERSION" > "$dest/VERSION"
echo "uPlot $VERSION -> $dest"
