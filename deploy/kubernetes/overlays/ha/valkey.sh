#!/bin/sh
# Starts, probes and re-keys the bundled Valkey: the single instance of
# overlays/ha (TOPOLOGY=standalone) and the three members of
# overlays/ha-sentinel, each pod a data node plus a sentinel (the default).
#   sh valkey.sh server | sentinel | probe-server | probe-sentinel | pre-stop
#   sh valkey.sh rotate-start < new-password | rotate-finish < old-password
# Nothing is persisted: a sentinel member that starts asks the running ones
# who the primary is and joins as its replica (the very first time member 0 is
# the primary). The settings below can be overridden from the environment, so
# the script can be tried outside Kubernetes; the defaults are the
# StatefulSet's of overlays/ha-sentinel.
set -eu

TOPOLOGY=${TOPOLOGY:-sentinel}
# The primary's name in the sentinels: the last part of GATEWAY_REDIS_URL in
# overlays/ha-sentinel/kustomization.yaml.
PRIMARY_NAME=${PRIMARY_NAME:-budget}
# The members as everyone names them (sentinels, replicas, gateways): each
# pod's stable DNS name through the headless Service, resolved in the pods'
# own namespace. Stable names keep a restarted member the same member.
MEMBERS=${MEMBERS:-"provisioning-gateway-redis-0.provisioning-gateway-redis-headless provisioning-gateway-redis-1.provisioning-gateway-redis-headless provisioning-gateway-redis-2.provisioning-gateway-redis-headless"}
SELF=${SELF:-"$(hostname).provisioning-gateway-redis-headless"}
PORT=${PORT:-6379}
SENTINEL_PORT=${SENTINEL_PORT:-26379}
# All addresses (IPv6 too where there is one); probes come in on LOCAL_HOST.
BIND=${BIND:-"* -::*"}
LOCAL_HOST=${LOCAL_HOST:-127.0.0.1}
PASSWORD_FILE=${PASSWORD_FILE:-/var/run/secrets/redis/password}
RUN_DIR=${RUN_DIR:-/run/valkey}
DATA_DIR=${DATA_DIR:-/data}

log() { echo "valkey.sh: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# One password for everything: the data nodes' requirepass and masterauth,
# the sentinels' requirepass and auth-pass (the gateways give the sentinels
# the data nodes' credentials). The gateway trims the file; a password with
# whitespace inside is refused rather than half-used.
check_password() { # WHAT VALUE
  case $2 in
    '' | *[[:space:]]*) die "$1 is empty or holds whitespace" ;;
  esac
}
read_password() {
  pw=$(cat "$PASSWORD_FILE") || die "cannot read $PASSWORD_FILE (Secret provisioning-gateway-redis-auth)"
  check_password "$PASSWORD_FILE" "$pw"
}

# A value for a config file: in double quotes, with \ and " escaped. Lines
# holding it are written with printf: some shells' echo reads backslashes.
quoted() {
  printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"
}

# valkey-cli HOST PORT ARGS...: authenticated through the environment
# (REDISCLI_AUTH, read by every Valkey and Redis version), never the command
# line, and bounded in time. Replies come raw (no terminal), errors included,
# and the exit status does not tell them apart: callers compare the reply.
cli() {
  cli_host=$1 cli_port=$2
  shift 2
  REDISCLI_AUTH=$pw timeout 3 valkey-cli -h "$cli_host" -p "$cli_port" "$@"
}
# The same with a secret as the last argument, passed on stdin (-x).
cli_secret() { # SECRET HOST PORT ARGS...
  cli_secret=$1 cli_host=$2 cli_port=$3
  shift 3
  printf '%s' "$cli_secret" |
    REDISCLI_AUTH=$pw timeout 3 valkey-cli -h "$cli_host" -p "$cli_port" -x "$@"
}

# is_primary HOST: its data node says it is a primary (ROLE answers "master";
# "primary" in case a later Valkey says so).
is_primary() {
  case $(cli "$1" "$PORT" ROLE 2>/dev/null | sed -n 1p) in
    master | primary) return 0 ;;
    *) return 1 ;;
  esac
}

# The current primary's name: what the first sentinel that answers says; else
# a data node running as primary (every sentinel restarted); else, nothing
# running yet, the first member. If every member restarts at once while the
# first cannot be scheduled, they wait for it.
find_primary() {
  for m in $MEMBERS; do
    reply=$(cli "$m" "$SENTINEL_PORT" SENTINEL get-master-addr-by-name "$PRIMARY_NAME" 2>/dev/null) || continue
    host=$(printf '%s\n' "$reply" | sed -n 1p)
    port=$(printf '%s\n' "$reply" | sed -n 2p)
    if [ -n "$host" ] && [ "$port" = "$PORT" ]; then
      echo "$host"
      return
    fi
  done
  for m in $MEMBERS; do
    [ "$m" != "$SELF" ] || continue
    if is_primary "$m"; then
      echo "$m"
      return
    fi
  done
  # shellcheck disable=SC2086 # MEMBERS is a list of words
  set -- $MEMBERS
  echo "$1"
}

server() {
  read_password
  primary=$SELF
  if [ "$TOPOLOGY" = sentinel ]; then
    primary=$(find_primary)
  fi
  conf=$RUN_DIR/server.conf
  umask 077
  {
    echo "bind $BIND"
    echo "port $PORT"
    # A second lock (the image turns it off): should the password ever be
    # empty, only local clients get in.
    echo "protected-mode yes"
    echo "dir $DATA_DIR"
    # The state is ephemeral: no RDB snapshots, no AOF.
    echo "save \"\""
    echo "appendonly no"
    # Budget keys are tiny; idempotency records (about 300 bytes per call
    # with a request_id, for 24 h) and batches (about 250 bytes per request
    # until retention) are not. Refuse writes rather than evict any of it.
    echo "maxmemory 192mb"
    echo "maxmemory-policy noeviction"
    printf 'requirepass %s\n' "$(quoted "$pw")"
    if [ "$TOPOLOGY" = sentinel ]; then
      # Replication through the socket on both ends, never a file (a
      # replica's copy left in /data would be loaded, stale, when its
      # container restarts).
      echo "repl-diskless-sync yes"
      echo "repl-diskless-load swapdb"
      # A replica that (re)starts is empty until it has synced, and a
      # failover could promote it: sync at once, not after waiting for more.
      echo "repl-diskless-sync-delay 0"
      # Known to the primary and the sentinels by name, not by pod IP.
      echo "replica-announce-ip $SELF"
      echo "replica-announce-port $PORT"
      # For when this member is a replica, now or after a failover.
      printf 'masterauth %s\n' "$(quoted "$pw")"
      if [ "$primary" != "$SELF" ]; then
        echo "replicaof $primary $PORT"
      fi
    fi
  } >"$conf"
  if [ "$primary" = "$SELF" ]; then
    log "starting as the primary"
  else
    log "starting as a replica of $primary"
  fi
  exec valkey-server "$conf"
}

sentinel() {
  read_password
  # A sentinel refuses to start on a name it cannot resolve; a member that
  # is not scheduled yet has none. (An address needs no resolving.)
  while :; do
    primary=$(find_primary)
    case $primary in
      *[!0-9a-fA-F.:]*) getent hosts "$primary" >/dev/null 2>&1 && break ;;
      *) break ;;
    esac
    log "waiting for $primary to resolve"
    sleep 2
  done
  conf=$RUN_DIR/sentinel.conf
  umask 077
  {
    echo "bind $BIND"
    echo "port $SENTINEL_PORT"
    echo "protected-mode yes"
    echo "dir $RUN_DIR"
    # The same ID on every start: the other sentinels then see a restarted
    # sentinel as the one they knew, not as one more voter that never
    # answers (which would raise the majority a failover needs).
    echo "sentinel myid $(printf '%s' "$SELF" | sha1sum | cut -c1-40)"
    echo "sentinel resolve-hostnames yes"
    echo "sentinel announce-hostnames yes"
    echo "sentinel announce-ip $SELF"
    echo "sentinel announce-port $SENTINEL_PORT"
    # Clients (the gateways, the other sentinels, this script) authenticate;
    # toward the other sentinels a sentinel uses the same password.
    printf 'requirepass %s\n' "$(quoted "$pw")"
    # Two of the three must find the primary down; a majority (two) elects
    # the sentinel that fails over.
    echo "sentinel monitor $PRIMARY_NAME $primary $PORT 2"
    printf 'sentinel auth-pass %s %s\n' "$PRIMARY_NAME" "$(quoted "$pw")"
    echo "sentinel down-after-milliseconds $PRIMARY_NAME 5000"
    echo "sentinel failover-timeout $PRIMARY_NAME 30000"
    echo "sentinel parallel-syncs $PRIMARY_NAME 1"
  } >"$conf"
  log "monitoring $primary"
  exec valkey-server "$conf" --sentinel
}

# Planned stops (rolling update, drain) of a sentinel member: a primary asks
# another member's sentinel to fail over now, and waits (about 10 s at most)
# until the sentinels name the new primary, instead of leaving them to notice
# it gone (5 s) first.
pre_stop() {
  [ "$TOPOLOGY" = sentinel ] || return 0
  read_password
  is_primary "$LOCAL_HOST" || return 0
  for m in $MEMBERS; do
    [ "$m" != "$SELF" ] || continue
    if [ "$(cli "$m" "$SENTINEL_PORT" SENTINEL FAILOVER "$PRIMARY_NAME" 2>/dev/null)" = OK ]; then
      deadline=$(($(date +%s) + 10))
      while [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 1
        if [ "$(cli "$m" "$SENTINEL_PORT" SENTINEL get-master-addr-by-name "$PRIMARY_NAME" 2>/dev/null | sed -n 1p)" != "$SELF" ]; then
          log "handed the primary over"
          return 0
        fi
      done
      log "no new primary after 10 s; stopping anyway"
      return 0
    fi
  done
  log "no sentinel would fail over; stopping anyway"
}

# Probes: an authenticated PING.
probe() {
  read_password
  [ "$(cli "$LOCAL_HOST" "$1" PING)" = PONG ]
}

# expect_ok WHAT REPLY: a command's reply must be OK.
expect_ok() {
  [ "$2" = OK ] || die "$1: $2"
}

# Password rotation without a gap (docs/deploying.md, "Rotate the Redis
# password"). rotate-start, run once in any member with the new password on
# stdin: every data node and sentinel accepts it besides the current one, then
# uses it toward the others. Next the Secret is replaced and the gateways
# restarted. rotate-finish, run in every member with the old password on
# stdin: once this member's Secret file holds the new password and its data
# node and sentinel accept it, they stop accepting the old one.
rotate_start() {
  read_password
  new=$(cat)
  check_password "the new password (stdin)" "$new"
  if [ "$TOPOLOGY" = sentinel ]; then members=$MEMBERS; else members=$LOCAL_HOST; fi
  for m in $members; do
    expect_ok "$m: ACL SETUSER" "$(cli_secret ">$new" "$m" "$PORT" ACL SETUSER default)"
    [ "$TOPOLOGY" = sentinel ] || continue
    expect_ok "$m sentinel: ACL SETUSER" "$(cli_secret ">$new" "$m" "$SENTINEL_PORT" ACL SETUSER default)"
  done
  log "every member accepts the new password"
  [ "$TOPOLOGY" = sentinel ] || return 0
  for m in $members; do
    expect_ok "$m: CONFIG SET masterauth" "$(cli_secret "$new" "$m" "$PORT" CONFIG SET masterauth)"
    expect_ok "$m sentinel: SENTINEL SET auth-pass" \
      "$(cli_secret "$new" "$m" "$SENTINEL_PORT" SENTINEL SET "$PRIMARY_NAME" auth-pass)"
    expect_ok "$m sentinel: SENTINEL CONFIG SET sentinel-pass" \
      "$(cli_secret "$new" "$m" "$SENTINEL_PORT" SENTINEL CONFIG SET sentinel-pass)"
  done
  log "every member uses the new password toward the others"
}

rotate_finish() {
  read_password
  old=$(cat)
  check_password "the old password (stdin)" "$old"
  [ "$pw" != "$old" ] ||
    die "$PASSWORD_FILE still holds the old password: replace the Secret, or wait for the kubelet to refresh the file (a minute or two)"
  ports=$PORT
  if [ "$TOPOLOGY" = sentinel ]; then ports="$PORT $SENTINEL_PORT"; fi
  for p in $ports; do
    [ "$(cli "$LOCAL_HOST" "$p" PING)" = PONG ] ||
      die "port $p does not accept the new password (did it restart before the Secret was replaced? Delete the pod: it starts with the new one)"
  done
  for p in $ports; do
    reply=$(cli_secret "<$old" "$LOCAL_HOST" "$p" ACL SETUSER default)
    case $reply in
      OK | *"does not exist"*) ;;
      *) die "port $p: ACL SETUSER: $reply" ;;
    esac
  done
  log "the old password is no longer accepted here"
}

case ${1:-} in
  server) server ;;
  sentinel) sentinel ;;
  probe-server) probe "$PORT" ;;
  probe-sentinel) probe "$SENTINEL_PORT" ;;
  pre-stop) pre_stop ;;
  rotate-start) rotate_start ;;
  rotate-finish) rotate_finish ;;
  *) die "usage: valkey.sh server|sentinel|probe-server|probe-sentinel|pre-stop|rotate-start|rotate-finish" ;;
esac
