#!/bin/sh
# Creates Synapse's and Enclave's databases and roles on the first start of the PostgreSQL
# container (mounted into /docker-entrypoint-initdb.d/, run once on an empty data folder).
#
# Synapse requires its database to be UTF8 with C collation and ctype, created from
# template0 (https://element-hq.github.io/synapse/latest/postgres.html); it refuses to
# start on anything else. Enclave's database only needs UTF8.
#
# Passwords come from the compose secrets (the *_PASSWORD_FILE variables), never from the
# environment. Names may be changed with SYNAPSE_DB, SYNAPSE_DB_USER, ENCLAVE_DB and
# ENCLAVE_DB_USER (tests use that on a shared server).
set -eu

secret() {
  # the file's content without its trailing newline; refuse an empty one
  value=$(cat "$1")
  if [ -z "$value" ]; then
    echo "init-databases: $1 is empty" >&2
    exit 1
  fi
  printf '%s' "$value"
}

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" \
  --dbname "${POSTGRES_DB:-${POSTGRES_USER:-postgres}}" \
  -v synapse_db="${SYNAPSE_DB:-synapse}" \
  -v synapse_user="${SYNAPSE_DB_USER:-synapse}" \
  -v synapse_password="$(secret "$SYNAPSE_DB_PASSWORD_FILE")" \
  -v enclave_db="${ENCLAVE_DB:-enclave}" \
  -v enclave_user="${ENCLAVE_DB_USER:-enclave}" \
  -v enclave_password="$(secret "$ENCLAVE_DB_PASSWORD_FILE")" <<'SQL'
CREATE ROLE :"synapse_user" LOGIN PASSWORD :'synapse_password';
CREATE DATABASE :"synapse_db" OWNER :"synapse_user"
  ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
CREATE ROLE :"enclave_user" LOGIN PASSWORD :'enclave_password';
CREATE DATABASE :"enclave_db" OWNER :"enclave_user" ENCODING 'UTF8' TEMPLATE template0;
SQL
echo "init-databases: created ${SYNAPSE_DB:-synapse} and ${ENCLAVE_DB:-enclave}"
