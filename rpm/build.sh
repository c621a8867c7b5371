#!/usr/bin/env bash
# Build the hq-gevent RPM (binary package) and print the path of the built .rpm.
#
#   rpm/build.sh            # output under rpm/_build/ (ignored by git)
#
# Needs rpmbuild (Debian: `apt-get install rpm`), /usr/bin/python3.11 (the interpreter the
# packaged virtualenv runs on; EL's python3.11 package installs the same path) and pip with
# network access to the package index for the wheel download. rpmbuild itself runs offline: the
# pinned wheels of rpm/requirements.txt and rpm/build-requirements.txt are packed as Source1.
#
# Environment: HQ_RPM_TOPDIR (rpmbuild's tree, default rpm/_build), HQ_RPM_WHEELS (the download
# cache, default rpm/_build/wheels), HQ_RPM_PYTHON (default /usr/bin/python3.11), PIP_PYTHON
# (a python with pip for `pip download`; default python3).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$here")
top=${HQ_RPM_TOPDIR:-$here/_build}
wheels=${HQ_RPM_WHEELS:-$here/_build/wheels}
venv_python=${HQ_RPM_PYTHON:-/usr/bin/python3.11}
pip_python=${PIP_PYTHON:-python3}
name=hq-gevent

version=$(sed -n 's/^__version__ = "\([^"]*\)".*/\1/p' "$src/hq_gevent/__init__.py")
[ -n "$version" ] || { echo "build.sh: no __version__ in hq_gevent/__init__.py" >&2; exit 1; }
arch=$(rpm --eval '%{_arch}')
[ -x "$venv_python" ] || { echo "build.sh: $venv_python not found" >&2; exit 1; }
pyver=$("$venv_python" -c 'import sys; print("%d%d" % sys.version_info[:2])')

mkdir -p "$top"/{SOURCES,BUILD,BUILDROOT,RPMS,SRPMS,SPECS} "$wheels"
log() { echo "build.sh: $*" >&2; }

# 1. Source0: the working tree as it is (tracked files plus new, not ignored ones), with the
#    commit hash filled in, as hq-gevent-<version>.tar.gz.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/$name-$version"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
  commit=$(git -C "$src" rev-parse --short=12 HEAD 2>/dev/null || true)
  [ -z "$(git -C "$src" status --porcelain 2>/dev/null)" ] || commit="${commit}-dirty"
  (cd "$src" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$stage/$name-$version"
else
  commit=""
  tar -C "$src" --exclude=./.git --exclude=./rpm/_build --exclude='__pycache__' -cf - . \
    | tar -xf - -C "$stage/$name-$version"
fi
sed -i "s/^__commit_hash__ = .*/__commit_hash__ = \"$commit\"/" "$stage/$name-$version/hq_gevent/__init__.py"
tar -C "$stage" --owner=0 --group=0 --sort=name -czf "$top/SOURCES/$name-$version.tar.gz" "$name-$version"

# 2. Source1: the pinned wheels for CPython $pyver on this architecture. manylinux_2_28 is the
#    newest tag accepted, so the binaries also load on EL8 (glibc 2.28). Downloads are cached
#    in $wheels; only pinned files are taken (--no-deps), so an unpinned dependency makes
#    the offline install in %install fail instead of slipping in.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_25 manylinux_2_24 \
           manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_${arch}")
done
log "downloading pinned wheels into $wheels"
"$pip_python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --implementation cp --python-version "${pyver:0:1}.${pyver:1}" --abi "cp$pyver" "${platforms[@]}" \
  -d "$wheels" -r "$here/requirements.txt" -r "$here/build-requirements.txt" >&2
wheel_stage="$stage/wheels"
mkdir "$wheel_stage"
# Only the wheels the pins name (the cache may hold older ones).
"$pip_python" - "$wheels" "$wheel_stage" "$here/requirements.txt" "$here/build-requirements.txt" <<'PY'
import os, re, shutil, sys
cache, dest, *reqs = sys.argv[1:]
canon = lambda s: re.sub(r"[-_.]+", "-", s).lower()
pins = {}
for req in reqs:
    for line in open(req):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canon(name)] = version.strip()
found = set()
for f in sorted(os.listdir(cache)):
    if f.endswith(".whl"):
        name, version = f.split("-")[:2]
        if pins.get(canon(name)) == version:
            shutil.copy2(os.path.join(cache, f), dest)
            found.add(canon(name))
missing = set(pins) - found
if missing:
    sys.exit(f"build.sh: no wheel for {sorted(missing)}")
PY
cp "$here/requirements.txt" "$wheel_stage/"
tar -C "$stage" --owner=0 --group=0 --sort=name -cf "$top/SOURCES/$name-wheels-$version-$arch.tar" wheels

# 3. The binary RPM. --nodeps: BuildRequires name EL packages, absent from Debian's empty rpmdb.
cp "$here/$name.spec" "$top/SPECS/"
log "rpmbuild $name $version ($arch)"
rpmbuild -bb --nodeps \
  --define "_topdir $top" \
  --define "hq_version $version" \
  --define "hq_python $venv_python" \
  "$top/SPECS/$name.spec" >"$top/rpmbuild.log" 2>&1 || { cat "$top/rpmbuild.log" >&2; exit 1; }
rpm_file=$(sed -n 's/^Wrote: \(.*\.rpm\)$/\1/p' "$top/rpmbuild.log" | grep -v -- '-debug' | tail -n 1)
[ -f "$rpm_file" ] || { cat "$top/rpmbuild.log" >&2; echo "build.sh: no .rpm written" >&2; exit 1; }
echo "$rpm_file"
