#!/usr/bin/env bash
# Creates the three Secrets the manifests mount, from random values kept in a local folder
# (git-ignored; back it up, or move the values into your secret manager):
#
#   enclave-appservice  as_token, hs_token, gate_secret          (Enclave and every Synapse pod)
#   enclave-database    password                                  (Enclave's PostgreSQL role)
#   synapse-secrets     signing.key, macaroon_secret_key, form_secret,
#                       registration_shared_secret, worker_replication_secret,
#                       database.yaml                             (Synapse; Enclave reads
#                                                                  registration_shared_secret)
#
# It also writes postgres-setup.sql: run it once as a superuser on the external PostgreSQL
# (roles with these passwords; Synapse's database with C collation from template0).
#
# Usage: create-secrets.sh --pg-host HOST [--pg-port 5432] [--dir DIR] [--namespace enclave]
#                          [--print]
# --print writes the values but only prints the kubectl commands that would create the
# Secrets.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="$HERE/secrets"
NAMESPACE=enclave
PG_HOST=""
PG_PORT=5432
KUBECTL="${KUBECTL:-kubectl}"
PRINT=0

while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --namespace) NAMESPACE="$2"; shift 2 ;;
    --pg-host) PG_HOST="$2"; shift 2 ;;
    --pg-port) PG_PORT="$2"; shift 2 ;;
    --print) PRINT=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "create-secrets.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$PG_HOST" ] || { echo "create-secrets.sh: --pg-host is required" >&2; exit 2; }
[[ "$PG_HOST" =~ ^[A-Za-z0-9.:-]+$ ]] && [[ "$PG_PORT" =~ ^[0-9]+$ ]] \
  || { echo "create-secrets.sh: --pg-host must be a host name or address, --pg-port a number" >&2; exit 2; }

random_hex() { openssl rand -hex 32; }

umask 077
mkdir -p "$DIR"

once() {
  # once NAME COMMAND...: DIR/NAME from COMMAND's output, only if it does not exist yet
  local name="$1"; shift
  [ -s "$DIR/$name" ] || "$@" >"$DIR/$name"
}

signing_key() {
  printf 'ed25519 a_%s %s\n' "$(random_hex | cut -c1-4)" "$(openssl rand 32 | base64 | tr -d '=\n')"
}

for name in as_token hs_token gate_secret enclave_db_password synapse_db_password \
            macaroon_secret_key form_secret registration_shared_secret \
            worker_replication_secret; do
  once "$name" random_hex
done
once signing.key signing_key

value() { tr -d '\n' <"$DIR/$1"; }

cat >"$DIR/database.yaml" <<YAML
database:
  name: psycopg2
  args:
    user: synapse
    password: "$(value synapse_db_password)"
    dbname: synapse
    host: $PG_HOST
    port: $PG_PORT
    sslmode: require
    cp_min: 5
    cp_max: 10
YAML

cat >"$DIR/postgres-setup.sql" <<SQL
-- Run once as a PostgreSQL superuser (psql -f postgres-setup.sql).
CREATE ROLE synapse LOGIN PASSWORD '$(value synapse_db_password)';
CREATE DATABASE synapse OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
CREATE ROLE enclave LOGIN PASSWORD '$(value enclave_db_password)';
CREATE DATABASE enclave OWNER enclave ENCODING 'UTF8' TEMPLATE template0;
SQL

create() {
  # create NAME KEY=FILE...: create or update the Secret NAME
  local name="$1"; shift
  local args=()
  for pair in "$@"; do args+=("--from-file=${pair%%=*}=$DIR/${pair#*=}"); done
  if [ "$PRINT" = 1 ]; then
    echo "kubectl -n $NAMESPACE create secret generic $name ${args[*]}"
    return
  fi
  $KUBECTL -n "$NAMESPACE" create secret generic "$name" "${args[@]}" \
    --dry-run=client -o yaml | $KUBECTL -n "$NAMESPACE" apply -f -
}

create enclave-appservice as_token=as_token hs_token=hs_token gate_secret=gate_secret
create enclave-database password=enclave_db_password
create synapse-secrets signing.key=signing.key macaroon_secret_key=macaroon_secret_key \
  form_secret=form_secret registration_shared_secret=registration_shared_secret \
  worker_replication_secret=worker_replication_secret database.yaml=database.yaml

echo "secrets kept in $DIR; run $DIR/postgres-setup.sql on $PG_HOST once" >&2
