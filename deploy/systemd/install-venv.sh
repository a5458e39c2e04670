#!/usr/bin/env bash
# Installs Enclave into a virtualenv and renders its systemd unit.
#
#   install-venv.sh --prefix DIR [--source REPO] [--python PYTHON]
#                   [--config-dir DIR] [--state-dir DIR] [--unit-dir DIR|-]
#                   [--user NAME] [--no-user] [--units-only]
#                   [--server-name NAME] [--homeserver-url URL]
#
#   --prefix       DIR/venv gets the virtualenv; the defaults below live under DIR too
#   --source       the checkout to install (default: the one this script is in); it is
#                  copied to a temporary folder and installed from there (not editable), so
#                  the checkout gets no build/ or *.egg-info
#   --python       the interpreter for the venv (default python3; Enclave needs >= 3.11)
#   --config-dir   default DIR/etc/enclave: config.yaml is written there from
#                  deploy/systemd/config.yaml if it does not exist (never overwritten)
#   --state-dir    default DIR/var/lib/enclave: the service's only writable folder
#   --unit-dir     default DIR/lib/systemd/system; '-' prints the unit on stdout
#   --user         the service's user (default enclave); created (system user, no login)
#                  when run as root, unless --no-user
#   --no-user      never create a user (the unit still names --user)
#   --units-only   skip the venv: only the folders, config.yaml (if absent) and the unit
#   --server-name, --homeserver-url   fill the new config.yaml
#
# Production layout (as root):
#   deploy/systemd/install-venv.sh --prefix /opt/enclave --config-dir /etc/enclave \
#     --state-dir /var/lib/enclave --unit-dir /etc/systemd/system \
#     --server-name corp.example.com
# Pip honours its usual environment (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_CACHE_DIR, ...).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "$0")" && pwd)"
SOURCE="$(cd "$SCRIPT_DIR/../.." && pwd)"
PREFIX=""
PYTHON=python3
CONFIG_DIR=""
STATE_DIR=""
UNIT_DIR=""
SERVICE_USER=enclave
CREATE_USER=1
UNITS_ONLY=0
SERVER_NAME=example.com
HOMESERVER_URL=http://127.0.0.1:8008

die() { echo "install-venv.sh: $*" >&2; exit 1; }
log() { echo "install-venv.sh: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --source) SOURCE="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --config-dir) CONFIG_DIR="$2"; shift 2 ;;
    --state-dir) STATE_DIR="$2"; shift 2 ;;
    --unit-dir) UNIT_DIR="$2"; shift 2 ;;
    --user) SERVICE_USER="$2"; shift 2 ;;
    --no-user) CREATE_USER=0; shift ;;
    --units-only) UNITS_ONLY=1; shift ;;
    --server-name) SERVER_NAME="$2"; shift 2 ;;
    --homeserver-url) HOMESERVER_URL="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[ -n "$PREFIX" ] || die "--prefix is required"
mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
CONFIG_DIR="${CONFIG_DIR:-$PREFIX/etc/enclave}"
STATE_DIR="${STATE_DIR:-$PREFIX/var/lib/enclave}"
UNIT_DIR="${UNIT_DIR:-$PREFIX/lib/systemd/system}"
VENV="$PREFIX/venv"

# The unit's paths go into ExecStart= lines and sed expressions: keep them plain.
for path in "$PREFIX" "$CONFIG_DIR" "$STATE_DIR"; do
  [[ "$path" =~ ^/[A-Za-z0-9._/+-]*$ ]] \
    || die "$path: use an absolute path of letters, digits and . _ / + - only"
done
[[ "$SERVICE_USER" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user $SERVICE_USER is not a user name"
[[ "$SERVER_NAME" =~ ^[A-Za-z0-9.-]+(:[0-9]+)?$ ]] || die "--server-name $SERVER_NAME is not a server name"
[[ "$HOMESERVER_URL" =~ ^https?://[A-Za-z0-9.:_/-]+$ ]] \
  || die "--homeserver-url $HOMESERVER_URL is not an http(s) URL"
[ -f "$SOURCE/pyproject.toml" ] || die "$SOURCE has no pyproject.toml (use --source REPO)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is older than Python 3.11"

# -- the virtualenv --------------------------------------------------------------------------
install_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  BUILD="$(mktemp -d)"
  trap 'rm -rf "$BUILD"' EXIT
  log "copying $SOURCE to $BUILD/src"
  mkdir "$BUILD/src"
  # Only what a build reads: no venvs, state, VCS data, secrets or build leftovers.
  tar -C "$SOURCE" \
    --exclude=./.git --exclude=./.venv --exclude=./venv --exclude=./var --exclude=./build \
    --exclude=./dist --exclude='*.egg-info' --exclude='__pycache__' --exclude=.pytest_cache \
    --exclude=.ruff_cache --exclude=./deploy/compose/secrets --exclude=./deploy/compose/generated \
    --exclude=./deploy/kubernetes/secrets -cf - . | tar -C "$BUILD/src" -xf -

  log "building the wheel and installing it into $VENV (not editable)"
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
  "${pip[@]}" wheel --no-deps --wheel-dir "$BUILD/dist" "$BUILD/src"
  local wheels=("$BUILD"/dist/*.whl)
  # with its dependencies; then again without them, so that a checkout newer than the
  # installed copy but with the same version number replaces it
  "${pip[@]}" install "${wheels[0]}"
  "${pip[@]}" install --force-reinstall --no-deps "${wheels[0]}"
  "$VENV/bin/enclave" --help >/dev/null || die "$VENV/bin/enclave does not run"
}
[ "$UNITS_ONLY" = 1 ] || install_venv

# -- folders, user, config -----------------------------------------------------------------------
if [ "$CREATE_USER" = 1 ] && [ "$(id -u)" = 0 ]; then
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
      --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
elif [ "$CREATE_USER" = 1 ]; then
  log "not root: user $SERVICE_USER not created (the unit still runs as it)"
fi

install -d -m 0755 "$CONFIG_DIR"
install -d -m 0750 "$CONFIG_DIR/secrets"
install -d -m 0750 "$STATE_DIR"
if [ "$(id -u)" = 0 ] && id "$SERVICE_USER" >/dev/null 2>&1; then
  chown "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
  chgrp "$SERVICE_USER" "$CONFIG_DIR/secrets"
fi

CONFIG="$CONFIG_DIR/config.yaml"
if [ -e "$CONFIG" ]; then
  log "keeping the existing $CONFIG"
else
  sed -e "s|^  server_name: example\.com$|  server_name: $SERVER_NAME|" \
      -e "s|^  url: http://127\.0\.0\.1:8008$|  url: $HOMESERVER_URL|" \
      -e "s|/var/lib/enclave|$STATE_DIR|g" \
      "$SCRIPT_DIR/config.yaml" >"$CONFIG.tmp"
  chmod 0644 "$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
  log "wrote $CONFIG"
fi

# -- the unit ------------------------------------------------------------------------------------
render_unit() {
  sed -e "s|/opt/enclave/venv|$VENV|g" \
      -e "s|/etc/enclave|$CONFIG_DIR|g" \
      -e "s|/var/lib/enclave|$STATE_DIR|g" \
      -e "s|^User=enclave$|User=$SERVICE_USER|" \
      -e "s|^Group=enclave$|Group=$SERVICE_USER|" \
      "$SCRIPT_DIR/enclave.service"
}

if [ "$UNIT_DIR" = "-" ]; then
  render_unit
else
  install -d -m 0755 "$UNIT_DIR"
  render_unit >"$UNIT_DIR/enclave.service.tmp"
  chmod 0644 "$UNIT_DIR/enclave.service.tmp"
  mv "$UNIT_DIR/enclave.service.tmp" "$UNIT_DIR/enclave.service"
  log "wrote $UNIT_DIR/enclave.service"
fi

cat >&2 <<EOF
install-venv.sh: done. Next:
  $VENV/bin/enclave registration -c $CONFIG -o /etc/matrix-synapse/enclave-registration.yaml
  chgrp $SERVICE_USER $CONFIG_DIR/secrets/*; chmod 0640 $CONFIG_DIR/secrets/*
  (add the registration to Synapse: deploy/synapse/homeserver-snippet.yaml; restart Synapse)
  $VENV/bin/enclave validate -c $CONFIG
  systemctl daemon-reload && systemctl enable --now enclave
EOF
