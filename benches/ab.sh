#!/usr/bin/env bash
# A/B of two sendguard builds on this machine: interleaved trials, each
# build started fresh (new spool on local disk) for every trial, the same
# load through the trusted plain listener into one smtp-sink. Prints per
# trial msg/s end to end, sendguard's CPU per message and the machine's
# idle and steal shares, then the mean msg/s of each build. Interleaving
# matters on a shared machine: its speed drifts by ±10% over minutes.
#
# usage: benches/ab.sh [--messages N] [--size BYTES] [--sessions S] [--rounds R] BIN_A BIN_B
#   e.g. git stash; cargo build --release; cp target/release/sendguard /tmp/sg-a
#        git stash pop; cargo build --release; cp target/release/sendguard /tmp/sg-b
#        benches/ab.sh --messages 60000 --rounds 4 /tmp/sg-a /tmp/sg-b
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

N=60000; SIZE=2048; SESSIONS=20; ROUNDS=4
while [ $# -gt 2 ]; do
  case "$1" in
    --messages) N=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ $# -eq 2 ] || { echo "usage: $0 [options] BIN_A BIN_B" >&2; exit 2; }
check_rounds "$ROUNDS"
BINS=("$1" "$2")

cargo build --release --quiet --benches
LOAD=(cargo bench --quiet --bench smtp_load --)
WORK=$(mktemp -d /tmp/sendguard-ab.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_sink
echo "machine: $(nproc) cores, $(uname -r); load: $N x ~$SIZE bytes over $SESSIONS sessions, $ROUNDS rounds"

trial() { # label binary
  local p sg before after s0 s1 out
  p=$(port)
  rm -rf "$WORK/spool" "$WORK/events.jsonl"
  plain_config "$WORK" "$p" "127.0.0.1:$SINK" "max_connections = 20" > "$WORK/sg.toml"
  "$2" serve --config "$WORK/sg.toml" 2> "$WORK/sg.log" &
  sg=$!
  wait_port "$p"
  # warm up (connections, allocator), then measure
  "${LOAD[@]}" --messages 1000 --size "$SIZE" --sessions "$SESSIONS" --sink-counter "$WORK/sink.out" --addr 127.0.0.1:"$p" --label warm > /dev/null
  before=$(awk '{print $14+$15}' /proc/$sg/stat); s0=$(head -1 /proc/stat)
  out=$("${LOAD[@]}" --messages "$N" --size "$SIZE" --sessions "$SESSIONS" --sink-counter "$WORK/sink.out" --addr 127.0.0.1:"$p" --label "$1")
  after=$(awk '{print $14+$15}' /proc/$sg/stat); s1=$(head -1 /proc/stat)
  kill "$sg"; wait "$sg" 2>/dev/null || true
  python3 - "$1" "$out" "$before" "$after" "$(getconf CLK_TCK)" "$s0" "$s1" <<'PY'
import json, sys
label, d = sys.argv[1], json.loads(sys.argv[2])
c0, c1, hz = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
a = [int(x) for x in sys.argv[6].split()[1:]]; b = [int(x) for x in sys.argv[7].split()[1:]]
tot = sum(b[:8]) - sum(a[:8]); idle = (b[3] + b[4]) - (a[3] + a[4]); steal = b[7] - a[7]
print(json.dumps({"label": label, "msg_per_s": d["msg_per_s"], "errors": d["errors"],
                  "sendguard_cpu_us_per_msg": round((c1 - c0) / hz * 1e6 / d["messages"], 1),
                  "idle_pct": round(100 * idle / tot, 1), "steal_pct": round(100 * steal / tot, 1)}))
PY
}

for r in $(seq 1 "$ROUNDS"); do
  for i in 0 1; do
    trial "$([ $i = 0 ] && echo A || echo B)" "${BINS[$i]}" | tee -a "$WORK/results"
  done
done
python3 - "$WORK/results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for label in ("A", "B"):
    r = [x["msg_per_s"] for x in rows if x["label"] == label]
    print(f"{label}: mean {sum(r) / len(r):.0f} msg/s over {len(r)} trials")
a = [x["msg_per_s"] for x in rows if x["label"] == "A"]
b = [x["msg_per_s"] for x in rows if x["label"] == "B"]
print(f"B/A: {sum(b) / sum(a):.3f}; B ahead in {sum(y > x for x, y in zip(a, b))} of {len(a)} rounds")
PY
