#!/usr/bin/env bash
# `make serve`: the device set-up on this machine, without touching /etc.
#
# Starts mosquitto with devices/mosquitto/edge-sdk.conf (localhost listener, no anonymous
# clients, password file, per-user ACL), rewritten to use files under $WORK, then runs the daemon
# on ENGINE as user `edge-daemon` until Ctrl-C. A client user `demo` is created for apps.
#
#   devices/serve_local.sh ENGINE [PORT]
set -euo pipefail

ENGINE=${1:?usage: serve_local.sh ENGINE [PORT]}
PORT=${2:-1883}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-$(dirname "$ENGINE")/broker}
EDGE_SDK=${EDGE_SDK:-edge-sdk}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

# Passwords are made once and kept in $WORK (mode 600).
if [ ! -f "$WORK/passwords.env" ]; then
    umask 077
    printf 'DAEMON_PASSWORD=%s\nDEMO_PASSWORD=%s\n' "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
        "$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$WORK/passwords.env"
fi
# shellcheck source=/dev/null
. "$WORK/passwords.env"
rm -f "$WORK/edge-sdk.passwd"
"$HERE/mosquitto/add_user.sh" "$WORK/edge-sdk.passwd" edge-daemon "$DAEMON_PASSWORD"
"$HERE/mosquitto/add_user.sh" "$WORK/edge-sdk.passwd" demo "$DEMO_PASSWORD"
cp "$HERE/mosquitto/edge-sdk.acl" "$WORK/edge-sdk.acl"
sed -e "s|^listener 1883 127.0.0.1|listener $PORT 127.0.0.1|" \
    -e "s|/etc/mosquitto/edge-sdk.passwd|$WORK/edge-sdk.passwd|" \
    -e "s|/etc/mosquitto/edge-sdk.acl|$WORK/edge-sdk.acl|" \
    "$HERE/mosquitto/edge-sdk.conf" > "$WORK/mosquitto.conf"
# As root mosquitto would switch to user `mosquitto`, who cannot read files made here.
[ "$(id -u)" = 0 ] && echo "user root" >> "$WORK/mosquitto.conf"

mosquitto -c "$WORK/mosquitto.conf" > "$WORK/mosquitto.log" 2>&1 &
BROKER=$!
trap 'kill $BROKER 2>/dev/null; wait $BROKER 2>/dev/null' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    kill -0 $BROKER 2>/dev/null || { cat "$WORK/mosquitto.log"; exit 1; }
    sleep 0.1
done
echo "mosquitto on 127.0.0.1:$PORT (log: $WORK/mosquitto.log)"
echo "client user 'demo', password in $WORK/passwords.env. Try, in another shell:"
echo "  . $WORK/passwords.env && .venv/bin/python examples/python/chat.py --port $PORT --device-id demo \\"
echo "      --username demo --password \"\$DEMO_PASSWORD\" 'Where is the charging dock?'"
EDGE_SDK_PASSWORD=$DAEMON_PASSWORD "$EDGE_SDK" serve "$ENGINE" --host 127.0.0.1 --port "$PORT" \
    --username edge-daemon --device-id demo
