#!/usr/bin/env bash
# System packages the test suite needs (idempotent): rpmbuild/rpmlint for the RPM checks,
# systemd-analyze/systemd-nspawn/logrotate for the unit checks, chromium for the UI tests,
# wrk for bench calibration, prometheus for its promtool (checks etc/'s alert rules and scrape example),
# postgresql for the PostgreSQL store's tests and bench.
set -euo pipefail
need=()
command -v rpmbuild >/dev/null || need+=(rpm)
command -v rpm2cpio >/dev/null || need+=(rpm2cpio)
command -v rpmlint >/dev/null || need+=(rpmlint)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v chromium >/dev/null || need+=(chromium)
command -v wrk >/dev/null || need+=(wrk)
command -v cpio >/dev/null || need+=(cpio)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v logrotate >/dev/null || need+=(logrotate)
command -v openssl >/dev/null || need+=(openssl)
command -v promtool >/dev/null || need+=(prometheus)
# PostgreSQL's server for the store = "postgresql" tests (tests/pgcluster.py runs initdb/pg_ctl
# from /usr/lib/postgresql/<ver>/bin as the postgres user the package creates).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
