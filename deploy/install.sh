#!/usr/bin/env bash
# Installs what Enclave's stack and tests need on a fresh Debian machine, then the Python
# packages into a venv. Idempotent. Usage: deploy/install.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"

# Debian packages the tests use: OpenLDAP's slapd and tools for the directory-sync tests
# (a private instance on loopback; the package's own daemon is not used), and Chromium,
# which opens exported transcripts headless (driven by Playwright, no browser download),
# and rsyslog with its OpenSSL driver (a private rsyslogd, plain and TLS, for the
# audit-streaming tests and benchmark).
APT_PACKAGES=(slapd ldap-utils chromium rsyslog rsyslog-openssl)
# promtool (from the prometheus package: Debian has no promtool alone) checks and unit-tests
# deploy/monitoring's alert rules and the dashboard's queries; the daemon is not used
APT_PACKAGES+=(prometheus)
# Node + npm for the E2EE tests' staff client with Element's own crypto (matrix-js-sdk)
command -v node >/dev/null 2>&1 || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
python3 -c "import ensurepip, venv" 2>/dev/null || APT_PACKAGES+=(python3-venv)
# pg_dump/pg_restore for deploy/backup and its tests (any installed version will do)
command -v pg_dump >/dev/null 2>&1 && command -v pg_restore >/dev/null 2>&1 \
  || APT_PACKAGES+=(postgresql-client)
missing=()
for pkg in "${APT_PACKAGES[@]+"${APT_PACKAGES[@]}"}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# PostgreSQL: the store and integration tests use the machine's server on 127.0.0.1:5432.
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  else
    echo "note: no PostgreSQL on 127.0.0.1:5432; its tests will be skipped" \
         "(set ENCLAVE_REQUIRE_POSTGRES=1 to make that an error)"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# Enclave and, beside it, the local dev/test launchers (deploy/local: ``make run``, the
# integration tests and benches import ``devstack``), both editable, in one resolution
"$VENV/bin/python" -m pip install -q -e '.[dev]' -e deploy/local 2>&1 \
  | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import bridge, devstack, synapse, nio, mautrix" \
  || { echo "error: Python packages did not install" >&2; exit 1; }
# The E2EE tests' Element client: matrix-js-sdk (Rust crypto) + fake-indexeddb, pinned by
# tests/e2ee_client/package-lock.json, into that folder's node_modules (git-ignored).
if [ ! -d tests/e2ee_client/node_modules/matrix-js-sdk ] \
   || [ tests/e2ee_client/package-lock.json -nt tests/e2ee_client/node_modules ]; then
  (cd tests/e2ee_client && npm ci --no-audit --no-fund --loglevel=error) \
    || { echo "error: npm ci in tests/e2ee_client failed" >&2; exit 1; }
fi
echo "installed into $VENV"
