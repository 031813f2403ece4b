# Sourced by tests/run.sh: start a throwaway PostgreSQL server on loopback for the suite's second pass and export
# LORAOPS_TEST_DB. Installs Debian's postgresql when it is missing (CI machines start bare). Stopped on exit.
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$PG_BIN" ]; then
  echo "installing postgresql (Debian packages)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || true
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
if [ -z "$PG_BIN" ]; then
  echo "PostgreSQL is not available: the PostgreSQL pass cannot run" >&2
  return 1
fi
PG_DIR=$(mktemp -d /tmp/loraops-pg.XXXXXX)
PG_PORT=${LORAOPS_PG_PORT:-55432}
# postgres refuses to run as root: run it as the 'postgres' system user when we are root.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$PG_DIR"
  PG_AS=(runuser -u postgres --)
else
  PG_AS=()
fi
"${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust --no-sync >/dev/null
"${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off -c max_connections=200" start >/dev/null
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres loraops_test
export LORAOPS_TEST_DB="postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/loraops_test"
stop_postgres() { "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1; rm -rf "$PG_DIR"; }
trap stop_postgres EXIT
