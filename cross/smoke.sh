#!/usr/bin/env bash
# Smoke test of a (cross-built) holdfast binary, optionally under an emulator:
#   cross/smoke.sh BINARY [RUNNER ARGS...]
#   cross/smoke.sh target/aarch64-unknown-linux-gnu/dist/holdfast qemu-aarch64 -L /usr/aarch64-linux-gnu
#   cross/smoke.sh target/armv7-unknown-linux-musleabihf/dist/holdfast qemu-arm
#
# 1. BINARY --version.
# 2. Start `holdfast run` on a free port on 127.0.0.1; a durable MQTT 3.1.1 session subscribes to a
#    topic at QoS 1 and disconnects; mosquitto_pub publishes one QoS 1 message (PUBACK = committed).
# 3. SIGKILL the broker, start it again on the same data directory; the durable session reconnects
#    and must receive the message. Exit 0 only then.
# Needs mosquitto_pub/mosquitto_sub (Debian: mosquitto-clients) and python3 (free port, waiting).
# Bounded: loopback only; every wait has a timeout; the broker is killed on exit.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 BINARY [RUNNER ARGS...]" >&2
    exit 2
fi
bin=$1
shift
run=("$@" "$bin")
for tool in mosquitto_pub mosquitto_sub python3; do
    command -v "$tool" >/dev/null || {
        echo "smoke: $tool not found (apt-get install mosquitto-clients python3)" >&2
        exit 1
    }
done

dir=$(mktemp -d)
pid=
cleanup() {
    [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

echo "smoke: ${run[*]} --version"
"${run[@]}" --version

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$dir/holdfast.toml" <<EOF
data_dir = "$dir/data"
[[listener]]
bind = "127.0.0.1:$port"
[log]
level = "warn"
EOF

start() {
    "${run[@]}" run --config "$dir/holdfast.toml" 2>>"$dir/broker.log" &
    pid=$!
    for _ in $(seq 300); do # up to 30 s: qemu start-up is slow on a busy machine
        if python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "smoke: broker did not start listening on 127.0.0.1:$port" >&2
    cat "$dir/broker.log" >&2
    exit 1
}

msg="smoke-$$-$RANDOM"
start
echo "smoke: broker up on 127.0.0.1:$port (pid $pid)"
mosquitto_sub -h 127.0.0.1 -p "$port" -V mqttv311 -i smoke-durable -c -q 1 -t smoke/t -E -W 20
mosquitto_pub -h 127.0.0.1 -p "$port" -V mqttv311 -i smoke-pub -q 1 -t smoke/t -m "$msg"
echo "smoke: published '$msg' at QoS 1 to an offline durable session; SIGKILL"
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
pid=

start
echo "smoke: restarted (pid $pid)"
got=$(mosquitto_sub -h 127.0.0.1 -p "$port" -V mqttv311 -i smoke-durable -c -q 1 -t smoke/t -C 1 -W 30) || true
if [[ $got != "$msg" ]]; then
    echo "smoke: FAILED: expected '$msg' after SIGKILL + restart, got '$got'" >&2
    cat "$dir/broker.log" >&2
    exit 1
fi
echo "smoke: durable session got '$got' after SIGKILL + restart"
kill -TERM "$pid"
wait "$pid" 2>/dev/null || true
pid=
echo "smoke: passed"
