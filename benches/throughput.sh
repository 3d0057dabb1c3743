#!/usr/bin/env bash
# End-to-end throughput, in one run, on this machine:
#   (a) the load tool straight into smtp-sink (the physical limit),
#   (b) through sendguard (durable spool, relay to the same smtp-sink),
#       over the trusted plain listener and over STARTTLS + AUTH,
#   (c) with --postfix: through a private Postfix instance relaying to the sink,
#   (d) with --cluster: sendguard again in fleet mode ([cluster] on a private
#       redis-server), both sendguard runs with the same provider rate
#       (20,000/s: above what this machine reaches, so it never binds but
#       every message needs a token: local GCRA vs leases from Redis); prints
#       Redis commands per message.
# "End to end" = until the sink has counted every message.
#
# usage: benches/throughput.sh [--messages N] [--size BYTES] [--sessions S] [--postfix] [--cluster]
set -euo pipefail
cd "$(dirname "$0")/.."

N=20000; SIZE=2048; SESSIONS=20; POSTFIX=0; CLUSTER=0
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) N=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --postfix) POSTFIX=1; shift ;;
    --cluster) CLUSTER=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet --bins --benches
LOAD=(cargo bench --quiet --bench smtp_load --)
WORK=$(mktemp -d /tmp/sendguard-bench.XXXXXX)
chmod 755 "$WORK"   # Postfix daemons run unprivileged
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -f "$WORK/postfix/conf/main.cf" ]; then postfix -c "$WORK/postfix/conf" stop >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

. benches/lib.sh

start_sink

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "load: $N messages of ~$SIZE bytes over $SESSIONS sessions"

run() { "${LOAD[@]}" --messages "$N" --size "$SIZE" --sessions "$SESSIONS" --sink-counter "$WORK/sink.out" "$@"; }

DIRECT=$(run --addr 127.0.0.1:"$SINK" --label direct-to-sink)
echo "$DIRECT"

# sendguard: trusted plain listener + STARTTLS/AUTH listener, spool on local disk
P_PLAIN=$(port); P_TLS=$(port)
HASH=$(printf 'bench-password' | target/release/sendguard hash-password)
cat > "$WORK/sendguard.toml" <<TOML
[server]
hostname = "bench.local"
[log]
level = "warn"
[tls]
cert = "$PWD/config/dev/cert.pem"
key = "$PWD/config/dev/key.pem"
[[listeners]]
addr = "127.0.0.1:$P_PLAIN"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
tenant = "bench"
[[listeners]]
addr = "127.0.0.1:$P_TLS"
tls = "starttls"
auth = "required"
[limits]
max_message_bytes = 104857600
[[tenants]]
name = "bench"
sender_domains = ["local.example"]
guard = "off"  # measures the proxy, not DNS
[[tenants.users]]
username = "bench"
password_hash = "$HASH"
[spool]
dir = "$WORK/spool"
[relay]
addr = "127.0.0.1:$SINK"
tls = "none"
max_connections = 20
[events]
path = "$WORK/events.jsonl"
[shaping]
group_by_mx = false  # measures the proxy, not DNS (benches/shaping.rs measures shaping)
TOML
if [ "$CLUSTER" = 1 ]; then
  printf '[[shaping.provider]]\nname = "other"\nrate = "20000/s"\nburst = 100\n' >> "$WORK/sendguard.toml"
fi
target/release/sendguard serve --config "$WORK/sendguard.toml" 2> "$WORK/sendguard.log" &
SG=$!
PIDS+=($SG)
wait_port "$P_PLAIN"

cpu_ticks() { awk '{print $14+$15}' /proc/"$1"/stat; }
TICKS=$(getconf CLK_TCK)
# run a labelled load and report sendguard's CPU time per message
run_sg() {
  local before after out
  before=$(cpu_ticks "$SG")
  out=$(run "$@")
  after=$(cpu_ticks "$SG")
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["sendguard_cpu_us_per_msg"]=round((int(sys.argv[3])-int(sys.argv[2]))/int(sys.argv[4])*1e6/d["messages"],1); print(json.dumps(d))' "$out" "$before" "$after" "$TICKS"
}
rss() { echo "{\"label\":\"sendguard-rss-$1\",\"max_rss_kib\":$(awk '/VmHWM/{print $2}' /proc/$SG/status),\"rss_kib\":$(awk '/VmRSS/{print $2}' /proc/$SG/status)}"; }
SG_PLAIN=$(run_sg --addr 127.0.0.1:"$P_PLAIN" --label sendguard-plain)
echo "$SG_PLAIN"
rss after-plain
SG_TLS=$(run_sg --addr 127.0.0.1:"$P_TLS" --starttls --auth bench:bench-password --label sendguard-starttls-auth)
echo "$SG_TLS"
rss after-starttls-auth

if [ "$CLUSTER" = 1 ]; then
  kill "$SG"; wait "$SG" 2>/dev/null || true
  P_REDIS=$(port)
  redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no > "$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$P_REDIS"
  printf '[cluster]\nbackend = "redis"\nurl = "redis://127.0.0.1:%s/"\nnode_id = "bench"\n' "$P_REDIS" >> "$WORK/sendguard.toml"
  rm -rf "$WORK/spool" "$WORK/events.jsonl"
  target/release/sendguard serve --config "$WORK/sendguard.toml" 2> "$WORK/sendguard-cluster.log" &
  SG=$!
  PIDS+=($SG)
  wait_port "$P_PLAIN"
  for _ in $(seq 1 100); do redis-cli -p "$P_REDIS" zcard sendguard:nodes | grep -q 1 && break; sleep 0.05; done
  calls() { redis-cli -p "$P_REDIS" info commandstats | awk -F'[=,:]' '/^cmdstat_/{s+=$3} END{print s}'; }
  C0=$(calls)
  SG_CLUSTER=$(run_sg --addr 127.0.0.1:"$P_PLAIN" --label sendguard-plain-cluster)
  C1=$(calls)
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["redis_commands_per_msg"]=round((int(sys.argv[3])-int(sys.argv[2]))/d["messages"],3); print(json.dumps(d))' "$SG_CLUSTER" "$C0" "$C1"
  rss after-plain-cluster
fi

PF_LINE=""
if [ "$POSTFIX" = 1 ]; then
  P_PF=$(port)
  PF="$WORK/postfix"
  mkdir -p "$PF/conf" "$PF/queue" "$PF/data"
  chown postfix "$PF/data" 2>/dev/null || true
  cp /etc/postfix/master.cf "$PF/conf/master.cf"
  # listen on our port, no chroot
  sed -i -E "s/^smtp( +)inet( +)n( +)-( +)y/127.0.0.1:$P_PF inet n - n/; s/^([a-z]+ +[a-z]+ +[-n] +[-n] +)y /\1n /" "$PF/conf/master.cf"
  cat > "$PF/conf/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
myhostname = postfix-bench.local
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relayhost = [127.0.0.1]:$SINK
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
default_destination_concurrency_limit = 20
smtp_connection_cache_on_demand = yes
CF
  postfix -c "$PF/conf" start >/dev/null 2>&1
  wait_port "$P_PF"
  PF_LINE=$(run --addr 127.0.0.1:"$P_PF" --label postfix-relay --timeout 900)
  echo "$PF_LINE"
fi

python3 - "$DIRECT" "$SG_PLAIN" "$SG_TLS" "$PF_LINE" <<'PY'
import json, sys
d, p, t = (json.loads(x) for x in sys.argv[1:4])
pf = json.loads(sys.argv[4]) if sys.argv[4] else None
print(f"sendguard plain / direct          = {p['msg_per_s']/d['msg_per_s']:.2f}")
print(f"sendguard starttls+auth / direct  = {t['msg_per_s']/d['msg_per_s']:.2f}")
if pf:
    print(f"sendguard plain / postfix         = {p['msg_per_s']/pf['msg_per_s']:.1f}x")
PY
