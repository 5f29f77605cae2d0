#!/usr/bin/env bash
# Makes sure PostgreSQL answers on 127.0.0.1:5432, for the budget store's tests
# (operator/tests/budget_store.rs connect as `postgres` without a password).
#
# Quiet and quick when a server is already up. Otherwise: installs Debian's `postgresql` if it is
# missing, creates the cluster if there is none, starts it, and waits until it accepts
# connections. Trust authentication on loopback is configured only on a cluster this script
# installed or created; an existing cluster's pg_hba.conf is left alone.
set -euo pipefail

HOST=127.0.0.1
# Overridable to try the script on a side cluster without touching the main one.
PORT=${ENSURE_POSTGRES_PORT:-5432}
CLUSTER=${ENSURE_POSTGRES_CLUSTER:-main}

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }
ready() { pg_isready -q -h "$HOST" -p "$PORT" >/dev/null 2>&1; }

if command -v pg_isready >/dev/null 2>&1 && ready; then
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    log "root is needed to run: $*"
    exit 1
  fi
}

server_version() {
  # The newest installed server, e.g. 15.
  ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1
}

fresh=0
if [ -z "$(server_version)" ] || ! command -v pg_ctlcluster >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "PostgreSQL is not installed and this is not a Debian-like system; install PostgreSQL,"
    log "start it on $HOST:$PORT with trust auth for loopback, or set RINGFENCE_TEST_POSTGRES"
    exit 1
  fi
  log "installing PostgreSQL from Debian's packages"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fresh=1
fi

version=$(server_version)
if [ -z "$version" ]; then
  log "no PostgreSQL server under /usr/lib/postgresql after installing; check apt's output"
  exit 1
fi

if ! pg_lsclusters --no-header 2>/dev/null | awk '{print $1 "/" $2}' | grep -qx "$version/$CLUSTER"; then
  log "creating cluster $version/$CLUSTER on port $PORT"
  as_root pg_createcluster "$version" "$CLUSTER" --port "$PORT" >/dev/null
  fresh=1
fi

if [ "$fresh" -eq 1 ]; then
  hba="/etc/postgresql/$version/$CLUSTER/pg_hba.conf"
  if ! grep -q '^# ringfence: trust loopback' "$hba"; then
    log "trusting loopback connections in $hba"
    tmp=$(mktemp)
    {
      echo '# ringfence: trust loopback (hack/ensure-postgres.sh; for tests on this machine only)'
      echo "host all all 127.0.0.1/32 trust"
      echo "host all all ::1/128 trust"
      cat "$hba"
    } >"$tmp"
    as_root cp "$tmp" "$hba"
    rm -f "$tmp"
  fi
fi

status=$(pg_lsclusters --no-header 2>/dev/null | awk -v c="$version/$CLUSTER" '$1 "/" $2 == c {print $4}')
if [ "$status" = "online" ]; then
  # Running but not answering on $HOST:$PORT yet, or its pg_hba.conf just changed.
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" reload
else
  log "starting cluster $version/$CLUSTER"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" start
fi

for _ in $(seq 1 60); do
  if ready; then
    exit 0
  fi
  sleep 1
done
log "PostgreSQL $version/$CLUSTER did not accept connections on $HOST:$PORT within 60s;"
log "see /var/log/postgresql/postgresql-$version-$CLUSTER.log"
exit 1
