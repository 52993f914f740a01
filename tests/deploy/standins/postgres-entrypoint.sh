#!/bin/sh
# The official image's first start, in short: initdb, then a server on the unix socket
# alone while the database is created (pg_isready without -h passes during this), then
# the real server on TCP.
set -e
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
if [ "$1" = "postgres" ]; then
  chown -R postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" > /tmp/pwfile
    chown postgres /tmp/pwfile
    as_postgres initdb --username="$user" --pwfile=/tmp/pwfile --auth-host=scram-sha-256 \
      --encoding=UTF8 --locale=C.UTF-8 \
      --auth-local=trust -D "$PGDATA" >/dev/null
    rm -f /tmp/pwfile
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$db" != postgres ]; then
      as_postgres psql -v ON_ERROR_STOP=1 --username="$user" --dbname=postgres \
        -c "CREATE DATABASE \"$db\""
    fi
    as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  fi
  exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" \
    -c listen_addresses='*'
fi
exec "$@"
