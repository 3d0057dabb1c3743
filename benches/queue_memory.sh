#!/usr/bin/env bash
# Memory and idle CPU with a large queue waiting: the upstream is down, N
# messages are submitted and deferred; 30 s later RSS (max_rss = the peak
# during intake), spool size and CPU use over 10 idle seconds are reported.
#
# usage: benches/queue_memory.sh [--messages N] [--size BYTES] [--sessions S]
set -euo pipefail
cd "$(dirname "$0")/.."
N=100000; SIZE=2048; SESSIONS=20
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) N=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bins --benches
WORK=$(mktemp -d /tmp/sendguard-qmem.XXXXXX)
SG=""
cleanup() { [ -n "$SG" ] && kill "$SG" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
. benches/lib.sh
P=$(port); DOWN=$(port)   # nothing listens on $DOWN: the upstream is down
{
  plain_config "$WORK" "$P" "127.0.0.1:$DOWN"
  printf '[queue]\nfirst_retry = "1h"\nmax_retry = "4h"\n'
} > "$WORK/sg.toml"
target/release/sendguard serve --config "$WORK/sg.toml" 2> "$WORK/sg.log" &
SG=$!
wait_port "$P"
T0=$(date +%s.%N)
cargo bench --quiet --bench smtp_load -- --addr 127.0.0.1:"$P" --messages "$N" --size "$SIZE" --sessions "$SESSIONS" --label submit
# wait until every message is deferred (its first attempt failed and it moved to its own file)
while [ "$(grep -c '"event":"deferred"' "$WORK/events.jsonl" 2>/dev/null || echo 0)" -lt "$N" ]; do sleep 0.5; done
T1=$(date +%s.%N)
ticks() { awk '{print $14+$15}' /proc/"$SG"/stat; }
sleep 30   # let the periodic malloc_trim run once (see src/pipeline.rs)
C0=$(ticks); sleep 10; C1=$(ticks)
python3 - "$N" "$T0" "$T1" "$C0" "$C1" "$(getconf CLK_TCK)" "$(awk '/VmRSS/{print $2}' /proc/$SG/status)" "$(awk '/VmHWM/{print $2}' /proc/$SG/status)" "$(du -sk "$WORK/spool" | cut -f1)" "$(ls "$WORK/spool/msg" | grep -c '\.msg$')" <<'PY'
import json, sys
n, t0, t1, c0, c1, hz, rss, hwm, du, files = sys.argv[1:]
print(json.dumps({
  "label": "queue-memory", "queued": int(n),
  "all_deferred_after_s": round(float(t1) - float(t0), 1),
  "rss_kib": int(rss), "max_rss_kib": int(hwm),
  "rss_bytes_per_queued_msg": round(int(rss) * 1024 / int(n)),
  "spool_kib": int(du), "message_files": int(files),
  "idle_cpu_percent_over_10s": round((int(c1) - int(c0)) / int(hz) / 10 * 100, 2),
}))
PY
