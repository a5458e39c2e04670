#!/usr/bin/env bash
# Prepares the compose stack from .env:
#
#   secrets/    one file per compose secret: random values, written once and never
#               overwritten (delete a file to rotate it), plus two files derived from them
#               on every run: synapse_database.yaml (Synapse's database section) and
#               enclave_registration.yaml (the appservice registration with both tokens)
#   generated/  the config files compose.yaml mounts, from the templates in enclave/,
#               synapse/ and element/ with example.com, matrix.example.com and
#               chat.example.com replaced by SERVER_NAME, MATRIX_HOST and ELEMENT_HOST
#
# Run it again after editing .env or a template (then `docker compose up -d` again).
# Needs bash, sed, awk and openssl (or /dev/urandom with od and base64).
#
# Usage: gen-secrets.sh [--env FILE] [--secrets DIR] [--out DIR]
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ENV_FILE="$HERE/.env"
SECRETS_DIR="$HERE/secrets"
OUT_DIR="$HERE/generated"

while [ $# -gt 0 ]; do
  case "$1" in
    --env) ENV_FILE="$2"; shift 2 ;;
    --secrets) SECRETS_DIR="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gen-secrets.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "gen-secrets.sh: $*" >&2; exit 1; }

# -- .env ----------------------------------------------------------------------------------
[ -f "$ENV_FILE" ] || die "$ENV_FILE not found: copy .env.example to .env and edit it"

env_value() {
  # the last KEY=VALUE line of .env (compose's own format: no export, optional quotes)
  local line value
  line="$(grep -E "^[[:space:]]*$1=" "$ENV_FILE" | tail -n 1 || true)"
  [ -n "$line" ] || die "$1 is not set in $ENV_FILE"
  value="${line#*=}"
  value="${value%\"}"; value="${value#\"}"
  value="${value%\'}"; value="${value#\'}"
  printf '%s' "$value"
}

SERVER_NAME="$(env_value SERVER_NAME)"
MATRIX_HOST="$(env_value MATRIX_HOST)"
ELEMENT_HOST="$(env_value ELEMENT_HOST)"
for name in SERVER_NAME MATRIX_HOST ELEMENT_HOST; do
  value="${!name}"
  [[ "$value" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] \
    || die "$name=$value is not a DNS name (letters, digits, '.' and '-'; no port)"
done
[ "$SERVER_NAME" != "$MATRIX_HOST" ] && [ "$SERVER_NAME" != "$ELEMENT_HOST" ] \
  && [ "$MATRIX_HOST" != "$ELEMENT_HOST" ] \
  || die "SERVER_NAME, MATRIX_HOST and ELEMENT_HOST must be three different names"

# -- random values ---------------------------------------------------------------------------
random_hex() {
  if command -v openssl >/dev/null 2>&1; then
    openssl rand -hex 32
  else
    head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n'
    echo
  fi
}

random_b64_unpadded() {
  if command -v openssl >/dev/null 2>&1; then
    openssl rand 32 | base64 | tr -d '=\n'
  else
    head -c 32 /dev/urandom | base64 | tr -d '=\n'
  fi
}

umask 077
mkdir -p "$SECRETS_DIR"
chmod 0700 "$SECRETS_DIR"

write_file() {
  # write_file PATH: stdin to PATH (replacing it), mode 0444: compose bind-mounts secrets
  # with their host mode and each container reads them as its own user (secrets/README.md)
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  cat >"$tmp"
  chmod 0444 "$tmp"
  mv -f "$tmp" "$1"
}

new_secret() {
  # new_secret NAME GENERATOR: create secrets/NAME once
  local path="$SECRETS_DIR/$1"
  if [ -s "$path" ]; then
    return
  fi
  "$2" | write_file "$path"
  echo "created secrets/$1"
}

signing_key() {
  # Synapse's signing key format: "ed25519 <key id> <unpadded base64 of a 32-byte seed>"
  local id
  id="a_$(random_hex | cut -c1-4)"
  printf 'ed25519 %s %s\n' "$id" "$(random_b64_unpadded)"
}

for name in postgres_password synapse_db_password enclave_db_password \
            as_token hs_token gate_secret registration_shared_secret \
            synapse_macaroon_secret_key synapse_form_secret ldap_admin_password; do
  new_secret "$name" random_hex
done
new_secret synapse_signing_key signing_key

read_secret() { tr -d '\n' <"$SECRETS_DIR/$1"; }

# -- derived secrets ---------------------------------------------------------------------------
# Synapse reads its database section from this second config file (compose.yaml command),
# because Synapse has no password file option for the database.
write_file "$SECRETS_DIR/synapse_database.yaml" <<YAML
# Written by gen-secrets.sh from secrets/synapse_db_password; do not edit.
database:
  name: psycopg2
  args:
    user: synapse
    password: "$(read_secret synapse_db_password)"
    dbname: synapse
    host: postgres
    port: 5432
    cp_min: 5
    cp_max: 10
YAML

# -- generated config --------------------------------------------------------------------------
render() {
  # render TEMPLATE OUTPUT: the example names replaced by .env's (placeholders first, so a
  # MATRIX_HOST that contains the SERVER_NAME is not replaced twice)
  mkdir -p "$(dirname "$2")"
  sed -e 's/matrix\.example\.com/@@MATRIX_HOST@@/g' \
      -e 's/chat\.example\.com/@@ELEMENT_HOST@@/g' \
      -e 's/example\.com/@@SERVER_NAME@@/g' "$1" \
    | sed -e "s/@@MATRIX_HOST@@/$MATRIX_HOST/g" \
          -e "s/@@ELEMENT_HOST@@/$ELEMENT_HOST/g" \
          -e "s/@@SERVER_NAME@@/$SERVER_NAME/g" >"$2.tmp"
  chmod 0644 "$2.tmp"
  mv -f "$2.tmp" "$2"
}

umask 022
render "$HERE/enclave/config.yaml" "$OUT_DIR/enclave/config.yaml"
render "$HERE/synapse/homeserver.yaml" "$OUT_DIR/synapse/homeserver.yaml"
render "$HERE/synapse/log.config" "$OUT_DIR/synapse/log.config"
render "$HERE/element/config.json" "$OUT_DIR/element/config.json"
umask 077

# -- the appservice registration -----------------------------------------------------------------
# The same content as `enclave registration` writes (bridge/cli/registration.py registration_dict), from
# the appservice section of the generated Enclave config and the token secrets.
appservice_value() {
  awk -v key="$1" '
    /^appservice:/ { inside = 1; next }
    /^[^[:space:]#]/ { inside = 0 }
    inside && $1 == key ":" { print $2; exit }
  ' "$OUT_DIR/enclave/config.yaml"
}
AS_ID="$(appservice_value id)"
AS_URL="$(appservice_value public_url)"
BOT_LOCALPART="$(appservice_value bot_localpart)"
NAMESPACE_PREFIX="$(appservice_value namespace_prefix)"
[ -n "$AS_ID" ] && [ -n "$AS_URL" ] && [ -n "$BOT_LOCALPART" ] && [ -n "$NAMESPACE_PREFIX" ] \
  || die "enclave/config.yaml: appservice id, public_url, bot_localpart and namespace_prefix must be set"
# Python's re.escape of a DNS name or a localpart prefix: of their characters
# (a-z 0-9 . _ = - / +) it escapes '.', '-' and '+'
regex_escape() { printf '%s' "$1" | sed -e 's/[.+-]/\\&/g'; }
SERVER_RE="$(regex_escape "$SERVER_NAME")"
PREFIX_RE="$(regex_escape "$NAMESPACE_PREFIX")"

write_file "$SECRETS_DIR/enclave_registration.yaml" <<YAML
# Enclave appservice registration, written by gen-secrets.sh; do not edit. It holds the
# tokens: it is a secret. Synapse reads it at start only: restart Synapse after a change.
id: $AS_ID
url: $AS_URL
as_token: $(read_secret as_token)
hs_token: $(read_secret hs_token)
sender_localpart: $BOT_LOCALPART
rate_limited: false
receive_ephemeral: true
de.sorunome.msc2409.push_ephemeral: true
namespaces:
  users:
    - exclusive: true
      regex: '@${PREFIX_RE}.*:${SERVER_RE}\$'
    - exclusive: false
      regex: '@.*:${SERVER_RE}\$'
  aliases:
    - exclusive: false
      regex: '#.*:${SERVER_RE}\$'
  rooms:
    - exclusive: false
      regex: '!.*'
YAML

echo "secrets in $SECRETS_DIR, config in $OUT_DIR (server name $SERVER_NAME)"
