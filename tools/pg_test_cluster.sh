#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests: `start` prints `export ...` lines for eval, `stop` removes it.
#
#   eval "$(tools/pg_test_cluster.sh start)"   # sets ACF_TEST_PG_URL and ACF_TEST_PG_DIR
#   tools/pg_test_cluster.sh restart           # (the DB-restart test uses this) needs ACF_TEST_PG_DIR
#   tools/pg_test_cluster.sh stop              # needs ACF_TEST_PG_DIR
#
# Why a script: CI runs as root, and PostgreSQL refuses to run as root, so the cluster lives in a temp dir owned by
# the `postgres` user and runs under runuser. It listens on loopback only, on a free port, with trust auth: it holds
# nothing and is deleted at stop. Installs Debian's postgresql when the binaries are missing (root only).
set -euo pipefail

find_bin() {
  local b
  b=$(command -v "$1" 2>/dev/null || true)
  if [ -z "$b" ]; then b=$(ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -1 || true); fi
  [ -n "$b" ] && b=$(readlink -f "$b")
  echo "$b"
}

as_owner() {  # run a command as the cluster's owner (postgres when we are root)
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_installed() {
  if [ -z "$(find_bin initdb)" ] || [ -z "$(find_bin pg_ctl)" ]; then
    if [ "$(id -u)" != 0 ]; then echo "pg_test_cluster: initdb/pg_ctl not found and not root to install postgresql" >&2; exit 1; fi
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres >&2
  fi
}

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

cmd="${1:-}"
case "$cmd" in
  start)
    ensure_installed
    INITDB=$(find_bin initdb); PG_CTL=$(find_bin pg_ctl)
    dir=$(mktemp -d /tmp/acf-pgtest.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    port="${ACF_TEST_PG_PORT:-$(free_port)}"
    as_owner "$INITDB" -D "$dir/data" -A trust -U acf --no-sync >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir/port"
    as_owner "$PG_CTL" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >&2 \
      || { cat "$dir/server.log" >&2; exit 1; }
    as_owner "$(dirname "$PG_CTL")/createdb" -h 127.0.0.1 -p "$port" -U acf acf_test >&2
    echo "export ACF_TEST_PG_DIR=$dir"
    echo "export ACF_TEST_PG_URL=postgresql://acf@127.0.0.1:$port/acf_test"
    ;;
  restart|stop)
    dir="${ACF_TEST_PG_DIR:?set ACF_TEST_PG_DIR (printed by start)}"
    PG_CTL=$(find_bin pg_ctl)
    port=$(cat "$dir/port")
    if [ "$cmd" = restart ]; then
      as_owner "$PG_CTL" -D "$dir/data" -l "$dir/server.log" -w -t 60 -m immediate \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" restart >&2
    else
      as_owner "$PG_CTL" -D "$dir/data" -w -m immediate stop >&2 || true
      rm -rf "$dir"
    fi
    ;;
  *)
    echo "usage: $0 start|restart|stop" >&2; exit 2;;
esac
