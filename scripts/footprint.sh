#!/usr/bin/env bash
# Footprint: binary sizes of the release and dist builds, and the daemon's resident memory
# idle and with N idle MQTT 3.1.1 connections (clean session, keep-alive 0) on loopback.
#
# Usage:
#   scripts/footprint.sh              # builds release and dist (dist takes minutes), N=1000
#   N=5000 scripts/footprint.sh
#   PROFILE=release NOBUILD=1 scripts/footprint.sh   # measure an existing build only
#   # a cross-built binary under qemu user-mode emulation (nothing is built):
#   BIN=target/aarch64-unknown-linux-gnu/dist/holdfast RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
#       scripts/footprint.sh
#
# With RUNNER the RSS is that of the emulator process: qemu-user runs the guest in its own
# process, so the figure includes qemu itself and its translated-code cache, not just the
# gateway. It is no measurement of a real ARM board; see cross/README.md.
#
# Needs python3 (the connections are plain sockets, no MQTT library). Bounded: the
# connections go to 127.0.0.1 only, the broker and the clients stop by themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

N="${N:-1000}"
PROFILE="${PROFILE:-dist}"

read -r -a runner <<<"${RUNNER:-}"
if [[ -n "${BIN:-}" ]]; then
    bin=$BIN
    printf '%10d bytes  %s\n' "$(stat -c %s "$bin")" "$bin"
else
    if [[ -z "${NOBUILD:-}" ]]; then
        cargo build --release --bin holdfast
        cargo build --profile dist --bin holdfast
    fi
    for p in release dist; do
        if [[ -f "target/$p/holdfast" ]]; then
            printf '%-8s %10d bytes  target/%s/holdfast\n' "$p" "$(stat -c %s "target/$p/holdfast")" "$p"
        fi
    done
    bin="target/$PROFILE/holdfast"
fi
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/holdfast.toml" <<EOF
data_dir = "$dir/data"
[[listener]]
bind = "127.0.0.1:$port"
[log]
level = "warn"
EOF
"${runner[@]}" "$bin" run --config "$dir/holdfast.toml" &
pid=$!
for _ in $(seq 300); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
sleep 2
rss() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
echo "${BIN:-profile $PROFILE}${RUNNER:+ under $RUNNER}: idle RSS $(rss) KiB"

python3 - "$port" "$N" "$pid" <<'EOF'
import socket, sys, time
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def connect_packet(cid):
    cid = cid.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x00"  # 3.1.1, clean session, keep-alive 0
    payload = len(cid).to_bytes(2, "big") + cid
    body = var + payload
    return bytes([0x10, len(body)]) + body

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

socks = []
t0 = time.time()
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), 5)
    s.sendall(connect_packet(f"idle-{i}"))
    socks.append(s)
for s in socks:
    ack = s.recv(4)
    assert ack[:1] == b"\x20" and ack[3:4] == b"\x00", ack
took = time.time() - t0
time.sleep(2)
print(f"{n} idle connections (CONNACK 0 each, {took:.1f}s to connect): RSS {rss()} KiB")
for s in socks:
    s.close()
time.sleep(2)
print(f"after they closed: RSS {rss()} KiB")
EOF
kill -TERM "$pid"
wait "$pid" || true
