#!/usr/bin/env bash
# Make sure a local PostgreSQL is running and holds an MLflow database owned by a role named
# after the current OS user, then print the backend URI for mlflow/server.py.
#
#   bash mlflow/setup_postgres.sh            # db "mlflow", role "$(id -un)"
#   CVAE_MLFLOW_DB=mlflow_test bash mlflow/setup_postgres.sh
#
# CVAE_PG_SOCKET_DIR (default /var/run/postgresql) and CVAE_PG_PORT (default 5432) name the
# server's Unix socket; a port given here is also written into the URI. With Debian's
# PG_CLUSTER_CONF_ROOT set, only the clusters under that root are looked at and started: the tests
# use that to run this script against a throwaway cluster instead of the machine's.
#
# The URI uses the Unix socket with peer authentication: no password exists anywhere and
# PostgreSQL needs no TCP listener for MLflow. Idempotent: safe to run on every `ray up`.
# Needs the Debian/Ubuntu "postgresql" package (pg_lsclusters, pg_ctlcluster) and either root
# or passwordless sudo (the rayproject/ray images give the "ray" user that).
set -euo pipefail

db_name="${CVAE_MLFLOW_DB:-mlflow}"
db_role="$(id -un)"
socket_dir="${CVAE_PG_SOCKET_DIR:-/var/run/postgresql}"
port="${CVAE_PG_PORT:-5432}"

die() { echo "mlflow/setup_postgres.sh: error: $*" >&2; exit 2; }

[[ "$db_name" =~ ^[a-z_][a-z0-9_]*$ ]] || die "database name '$db_name' must match [a-z_][a-z0-9_]*"
[[ "$port" =~ ^[0-9]+$ ]] || die "CVAE_PG_PORT '$port' is not a port number"
[[ "$db_role" =~ ^[a-z_][a-z0-9_]*$ ]] || die "OS user name '$db_role' cannot be used as a PostgreSQL role name"
command -v pg_lsclusters >/dev/null || die "PostgreSQL is not installed (apt-get install -y postgresql)"

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
    as_postgres() { runuser -u postgres -- "$@"; }
else
    as_root() { sudo -n "$@"; }
    as_postgres() { sudo -n -u postgres "$@"; }
fi

# Start every cluster that is down (containers have no systemd, so nothing else starts it).
# Its messages ("Removed stale pid file.") go to stderr: stdout carries only the URI, which
# callers capture with $(...).
clusters="$(pg_lsclusters --no-header)"
[ -n "$clusters" ] || die "no PostgreSQL cluster exists (pg_createcluster <version> main)"
while read -r version name _port status _rest; do
    if [ "$status" != "online" ]; then
        as_root pg_ctlcluster "$version" "$name" start >&2
    fi
done <<< "$clusters"

psql_admin() { as_postgres psql -h "$socket_dir" -p "$port" -v ON_ERROR_STOP=1 -tAc "$1"; }

for _ in $(seq 1 30); do
    psql_admin "SELECT 1" >/dev/null 2>&1 && break
    sleep 1
done
psql_admin "SELECT 1" >/dev/null || die "PostgreSQL did not accept connections on $socket_dir (port $port)"

if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = '$db_role'")" != "1" ]; then
    psql_admin "CREATE ROLE \"$db_role\" LOGIN" >/dev/null
fi
if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = '$db_name'")" != "1" ]; then
    psql_admin "CREATE DATABASE \"$db_name\" OWNER \"$db_role\"" >/dev/null
fi

echo "postgresql+psycopg://${db_role}@/${db_name}?host=${socket_dir}${CVAE_PG_PORT:+&port=${port}}"
