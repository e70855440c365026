# Shared set-up for bin/run and bin/test: a .venv with the project installed, PostgreSQL and
# Redis answering (started, or installed with apt-get and started, when none answers), the
# database created. Idempotent; honours DATABASE_URL and REDIS_URL. Sourced, not executed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p var

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/countdown}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
if [ -z "${SECRET_KEY:-}" ]; then
  # Readable by its owner only (a key written 0644 by an earlier version is tightened too).
  [ -s var/secret_key ] || (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(50))' > var/secret_key)
  chmod 600 var/secret_key
  SECRET_KEY="$(cat var/secret_key)"
  export SECRET_KEY
fi

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root to run: $*"; fi; }

apt_install() {
  command -v apt-get >/dev/null || die "$* missing and no apt-get to install it; install it or point DATABASE_URL/REDIS_URL at one"
  if [ ! -f var/.apt-updated ]; then as_root apt-get update -qq && touch var/.apt-updated; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Python -------------------------------------------------------------------------------
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ needed (found $("$PY" --version))"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv || { apt_install python3-venv && "$PY" -m venv .venv; }
fi
stamp="var/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  say "installing dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]"
  rm -f var/.installed-*; touch "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"

# --- PostgreSQL and Redis -----------------------------------------------------------------
eval "$(.venv/bin/python - <<'PYEOF'
import os, shlex, urllib.parse as u
d = u.urlparse(os.environ["DATABASE_URL"]); r = u.urlparse(os.environ["REDIS_URL"])
print(f"PGHOST_={shlex.quote(d.hostname or '127.0.0.1')} PGPORT_={d.port or 5432} PGDB_={shlex.quote(d.path.lstrip('/') or 'countdown')}")
print(f"RHOST_={shlex.quote(r.hostname or '127.0.0.1')} RPORT_={r.port or 6379}")
PYEOF
)"
is_local() { case "$1" in 127.*|localhost|::1) return 0;; *) return 1;; esac; }

pg_up() { .venv/bin/python -c "
import os, psycopg, urllib.parse as u
d = u.urlparse(os.environ['DATABASE_URL'])
psycopg.connect(host=d.hostname, port=d.port or 5432, user=d.username or 'postgres', password=d.password, dbname='postgres', connect_timeout=3).close()" 2>/dev/null; }
redis_up() { .venv/bin/python -c "
import os, redis; redis.Redis.from_url(os.environ['REDIS_URL'], socket_connect_timeout=3).ping()" 2>/dev/null; }

# The local cluster this script may start: Debian's newest, on the port its config names (5432
# when none is installed yet: that is where apt-get puts it).
cluster_ver() { ls /etc/postgresql 2>/dev/null | sort -V | tail -1 || true; }
cluster_port() {
  local conf port=""
  conf="/etc/postgresql/$(cluster_ver)/main/postgresql.conf"
  if [ -f "$conf" ]; then port="$(sed -nE 's/^\s*port\s*=\s*([0-9]+).*/\1/p' "$conf" | tail -1)"; fi
  echo "${port:-5432}"
}

if ! pg_up; then
  is_local "$PGHOST_" || die "PostgreSQL at $PGHOST_:$PGPORT_ does not answer; start it there, or point DATABASE_URL at one that answers"
  if [ "$PGPORT_" != "$(cluster_port)" ]; then
    die "nothing answers at $PGHOST_:$PGPORT_ (DATABASE_URL); the local cluster this script can start listens on $(cluster_port). Start your PostgreSQL server on $PGHOST_:$PGPORT_, or unset DATABASE_URL for the default ($(cluster_port), started here)"
  fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    say "installing PostgreSQL (apt-get)"
    apt_install postgresql
    ver="$(cluster_ver)"
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    # Local development only: trust connections from this machine.
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    as_root sed -i -E 's/^(local\s+all\s+postgres\s+)\S+/\1trust/' "$hba"
  fi
  ver="$(cluster_ver)"
  say "starting PostgreSQL $ver (cluster main, $PGHOST_:$PGPORT_)"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || as_root pg_ctlcluster "$ver" main start || true
  for _ in $(seq 30); do pg_up && break; sleep 1; done
  pg_up || die "PostgreSQL $ver did not start on $PGHOST_:$PGPORT_; see /var/log/postgresql/postgresql-$ver-main.log"
fi

# A Redis server started here belongs to this run: bin/run stops it when it stops (its EXIT
# trap calls stop_own_redis); bin/test leaves it for the next run and says so.
OWN_REDIS_PORT=""
OWN_REDIS_PIDFILE=""
stop_own_redis() {
  [ -n "$OWN_REDIS_PIDFILE" ] && [ -s "$OWN_REDIS_PIDFILE" ] || return 0
  say "stopping the Redis started on $RHOST_:$OWN_REDIS_PORT"
  kill "$(cat "$OWN_REDIS_PIDFILE")" 2>/dev/null || true
  for _ in $(seq 50); do [ -s "$OWN_REDIS_PIDFILE" ] || break; sleep 0.1; done
}

if ! redis_up; then
  is_local "$RHOST_" || die "Redis at $RHOST_:$RPORT_ does not answer; start it there, or point REDIS_URL at one that answers"
  command -v redis-server >/dev/null || { say "installing Redis (apt-get)"; apt_install redis-server; }
  mkdir -p var/redis
  OWN_REDIS_PORT="$RPORT_"
  OWN_REDIS_PIDFILE="$ROOT/var/redis/redis-$RPORT_.pid"
  redis_log="$ROOT/var/redis/redis-$RPORT_.log"
  say "starting Redis on $RHOST_:$RPORT_ (log $redis_log, pid file $OWN_REDIS_PIDFILE)"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$RPORT_" --save "" --appendonly no \
    --dir "$ROOT/var/redis" --logfile "$redis_log" --pidfile "$OWN_REDIS_PIDFILE" >/dev/null
  for _ in $(seq 20); do redis_up && break; sleep 0.5; done
  redis_up || die "Redis did not start on $RHOST_:$RPORT_; see $redis_log"
fi

.venv/bin/python - <<'PYEOF'
import os, psycopg, urllib.parse as u
d = u.urlparse(os.environ["DATABASE_URL"]); name = d.path.lstrip("/") or "countdown"
with psycopg.connect(host=d.hostname, port=d.port or 5432, user=d.username or "postgres",
                     password=d.password, dbname="postgres", autocommit=True) as c:
    if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
        c.execute(f'CREATE DATABASE "{name}"')
        print(f"created database {name}")
PYEOF
