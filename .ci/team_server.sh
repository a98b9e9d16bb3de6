#!/usr/bin/env bash
# A throwaway team tracking server for the integration test: PostgreSQL (from the distribution's
# packages) on loopback as the backend store, `mlflow server` serving the artifacts.
#   .ci/team_server.sh start DIR    -> prints the tracking URI; state and logs under DIR
#   .ci/team_server.sh stop DIR
set -euo pipefail
cmd=$1 dir=$2
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ "$cmd" = start ]; then
  [ -x "$PG_BIN/initdb" ] || { echo "PostgreSQL is not installed" >&2; exit 1; }
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mlflow_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  as_postgres "$PG_BIN/initdb" -D "$dir/pg" -A trust -U postgres >"$dir/initdb.log"
  as_postgres "$PG_BIN/pg_ctl" -D "$dir/pg" -o "-h 127.0.0.1 -p $pg_port -k $dir" -l "$dir/pg.log" -w start >/dev/null
  "$PG_BIN/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres mlflow
  mkdir -p "$dir/artifacts"
  nohup mlflow server --backend-store-uri "postgresql://postgres@127.0.0.1:$pg_port/mlflow" \
    --artifacts-destination "$dir/artifacts" --serve-artifacts -h 127.0.0.1 -p "$mlflow_port" \
    >"$dir/mlflow.log" 2>&1 &
  echo $! >"$dir/mlflow.pid"
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null 2>&1 && { echo "http://127.0.0.1:$mlflow_port"; exit 0; }
    sleep 1
  done
  echo "mlflow server did not start; see $dir/mlflow.log" >&2
  tail -20 "$dir/mlflow.log" >&2
  exit 1
elif [ "$cmd" = stop ]; then
  [ -f "$dir/mlflow.pid" ] && kill "$(cat "$dir/mlflow.pid")" 2>/dev/null || true
  [ -d "$dir/pg" ] && as_postgres "$PG_BIN/pg_ctl" -D "$dir/pg" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"  # the database and the server's artifacts: a test store, not kept
fi
