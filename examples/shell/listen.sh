#!/bin/sh
# Print what an edge_sdk device's microphone hears, one transcript per line, with
# mosquitto_pub / mosquitto_sub (Debian: mosquitto-clients) and jq.
#
#   examples/shell/listen.sh [-h host] [-p port] [-d device] [-t prefix] [-u user -P password]
#                            [-l language] [-n max_tokens] [-c count] [-T timeout_s] MICROPHONE
#
# Registers a listen job on MICROPHONE (a name in the device's capabilities), subscribes to its
# events topic first so nothing is missed, prints each transcript as it comes (voice events and
# errors on stderr) and cancels the job on exit: after -c transcripts, on Ctrl-C, or when nothing
# arrives for -T seconds. Exits 0 after -c transcripts, 1 if the device refuses the job, 3 if the
# device is not online or goes quiet. Protocol: edge_sdk/protocol/PROTOCOL.md, "Listen jobs".
set -eu

HOST=localhost PORT=1883 DEVICE=jetson PREFIX=edge MQTT_USER="" MQTT_PASS="" LANGUAGE="" MAX_TOKENS=64
COUNT=0 TIMEOUT=60
while getopts "h:p:d:t:u:P:l:n:c:T:" opt; do
  case "$opt" in
    h) HOST=$OPTARG ;; p) PORT=$OPTARG ;; d) DEVICE=$OPTARG ;; t) PREFIX=$OPTARG ;;
    u) MQTT_USER=$OPTARG ;; P) MQTT_PASS=$OPTARG ;; l) LANGUAGE=$OPTARG ;; n) MAX_TOKENS=$OPTARG ;;
    c) COUNT=$OPTARG ;; T) TIMEOUT=$OPTARG ;; *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || { echo "usage: $0 [options] MICROPHONE" >&2; exit 2; }
command -v jq >/dev/null 2>&1 || { echo "$0 needs jq" >&2; exit 2; }
MIC=$1

NAME=${MQTT_USER:-shell-$$}  # the client name is the username (the broker ACL checks it)
ROOT="$PREFIX/v1/$DEVICE"
JOB="sh$$"
EVENTS="$ROOT/events/$MIC/listen/$NAME/$JOB"
INBOX="$PREFIX/v1/clients/$NAME/res/$DEVICE/sh$$"
AUTH=""
[ -n "$MQTT_USER" ] && AUTH="-u $MQTT_USER -P $MQTT_PASS"
LANG_FIELD=""
[ -n "$LANGUAGE" ] && LANG_FIELD=",\"language\":\"$LANGUAGE\""

pub() {  # pub OP JSON
  # shellcheck disable=SC2086
  mosquitto_pub -V mqttv5 -h "$HOST" -p "$PORT" $AUTH -i "$NAME-pub-$$" -q 1 -t "$ROOT/req/$NAME/$1" -m "$2"
}

DIR=$(mktemp -d)
cleanup() {
  [ -n "${REGISTERED:-}" ] && pub listen_cancel "{\"v\":1,\"job_id\":\"$JOB\"}" || true
  kill "$SUB" 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkfifo "$DIR/events"
# shellcheck disable=SC2086
mosquitto_sub -V mqttv5 -h "$HOST" -p "$PORT" $AUTH -i "$NAME-sub-$$" -q 1 -v -W "$TIMEOUT" \
  -t "$ROOT/status" -t "$INBOX" -t "$EVENTS" > "$DIR/events" &
SUB=$!
exec 3<"$DIR/events"

IFS= read -r line <&3 || { echo "no status from device $DEVICE (daemon not running?)" >&2; exit 3; }
case "$line" in
  "$ROOT/status online") ;;
  *) echo "device $DEVICE is not online: ${line#"$ROOT/status "}" >&2; exit 3 ;;
esac

pub listen "{\"v\":1,\"request_id\":\"$JOB\",\"reply_to\":\"$INBOX\",\"microphone\":\"$MIC\",\"max_tokens\":$MAX_TOKENS$LANG_FIELD}"
HEARD=0
while IFS= read -r line <&3; do
  event=${line#* }  # mosquitto_sub -v: "topic payload"
  kind=$(printf '%s\n' "$event" | jq -r .type)
  case "$kind" in
    listen_registered) REGISTERED=1 ;;
    error) printf '%s\n' "$event" | jq -r '"error \(.status) \(.code): \(.message)"' >&2; exit 1 ;;
    voice_started|voice_stopped) printf '%s\n' "$event" | jq -r '"[\(.type) \(.t_s) s]"' >&2 ;;
    listen_error) printf '%s\n' "$event" | jq -r '"[\(.code): \(.message)]"' >&2 ;;
    listen_end) REGISTERED=""; printf '%s\n' "$event" | jq -r '"[ended: \(.reason)]"' >&2; exit 0 ;;
    transcript)
      printf '%s\n' "$event" | jq -r .text
      HEARD=$((HEARD + 1))
      [ "$COUNT" -gt 0 ] && [ "$HEARD" -ge "$COUNT" ] && exit 0 ;;
  esac
done
echo "nothing from the device within $TIMEOUT s" >&2
exit 3
