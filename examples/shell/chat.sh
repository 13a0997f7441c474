#!/bin/sh
# Ask an edge_sdk device a question with mosquitto_pub / mosquitto_sub (Debian: mosquitto-clients).
#
#   examples/shell/chat.sh [-h host] [-p port] [-d device] [-t prefix] [-u user -P password]
#                          [-n max_tokens] [-s seed] [-T timeout_s] "Where is the red box?"
#   examples/shell/chat.sh [options] -a command.wav            transcribe (a device with audio)
#   examples/shell/chat.sh [options] -a question.wav "Answer."  chat about the audio
#
# Audio (-a, WAV/FLAC/OGG) travels as the MQTT 5 binary payload with its content type, the JSON
# request in the user property "request".
# Prints the streamed answer (with jq installed; else the raw JSON events) and exits 0 on a
# result, 1 on an error reply, 3 if the device is not online or does not answer in time.
# Protocol: edge_sdk/protocol/PROTOCOL.md.
set -eu

HOST=localhost PORT=1883 DEVICE=jetson PREFIX=edge MQTT_USER="" MQTT_PASS="" MAX_TOKENS=128 SEED="" TIMEOUT=60
AUDIO=""
while getopts "h:p:d:t:u:P:n:s:T:a:" opt; do
  case "$opt" in
    h) HOST=$OPTARG ;; p) PORT=$OPTARG ;; d) DEVICE=$OPTARG ;; t) PREFIX=$OPTARG ;;
    u) MQTT_USER=$OPTARG ;; P) MQTT_PASS=$OPTARG ;; n) MAX_TOKENS=$OPTARG ;; s) SEED=$OPTARG ;;
    T) TIMEOUT=$OPTARG ;; a) AUDIO=$OPTARG ;; *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ -n "$AUDIO" ]; then
  [ $# -le 1 ] || { echo "usage: $0 [options] -a AUDIO [PROMPT]" >&2; exit 2; }
  case "$(dd if="$AUDIO" bs=4 count=1 2>/dev/null)" in
    RIFF) MIME=audio/wav ;; fLaC) MIME=audio/flac ;; OggS) MIME=audio/ogg ;;
    *) echo "$AUDIO: not a WAV, FLAC or OGG file" >&2; exit 2 ;;
  esac
else
  [ $# -eq 1 ] || { echo "usage: $0 [options] PROMPT" >&2; exit 2; }
fi

# The client name is the username (the broker ACL checks it); without login any unique name.
NAME=${MQTT_USER:-shell-$$}
OP=chat
[ -n "$AUDIO" ] && [ $# -eq 0 ] && OP=transcribe
REQ_TOPIC="$PREFIX/v1/$DEVICE/req/$NAME/$OP"
INBOX="$PREFIX/v1/clients/$NAME/res/$DEVICE/sh$$"
STATUS="$PREFIX/v1/$DEVICE/status"
RID="sh-$$-$(date +%s)"
AUTH=""
[ -n "$MQTT_USER" ] && AUTH="-u $MQTT_USER -P $MQTT_PASS"

# JSON-escape the prompt: backslashes, quotes, tabs, newlines.
PROMPT=$(printf '%s' "${1:-}" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/	/\\t/g' | awk 'NR>1{printf "\\n"}{printf "%s",$0}')
SEED_FIELD=""
[ -n "$SEED" ] && SEED_FIELD=",\"seed\":$SEED"
HEAD="\"v\":1,\"request_id\":\"$RID\",\"reply_to\":\"$INBOX\",\"max_tokens\":$MAX_TOKENS"
AUDIO_PART="{\"type\":\"audio\",\"payload\":true,\"mime\":\"${MIME:-}\"}"
if [ "$OP" = transcribe ]; then
  PAYLOAD="{$HEAD,\"audio\":{\"payload\":true,\"mime\":\"$MIME\"}}"
elif [ -n "$AUDIO" ]; then
  PAYLOAD="{$HEAD,\"messages\":[{\"role\":\"user\",\"content\":[$AUDIO_PART,{\"type\":\"text\",\"text\":\"$PROMPT\"}]}]$SEED_FIELD}"
else
  PAYLOAD="{$HEAD,\"messages\":[{\"role\":\"user\",\"content\":\"$PROMPT\"}]$SEED_FIELD}"
fi

DIR=$(mktemp -d)
trap 'kill $SUB 2>/dev/null || true; rm -rf "$DIR"' EXIT INT TERM
mkfifo "$DIR/events"
# One subscription for the inbox and the retained status: when the status line arrives, the
# inbox subscription is live too, so the request cannot race ahead of it.
# shellcheck disable=SC2086
mosquitto_sub -V mqttv5 -h "$HOST" -p "$PORT" $AUTH -i "$NAME-sub-$$" -q 1 -v -W "$TIMEOUT" \
  -t "$STATUS" -t "$INBOX" > "$DIR/events" &
SUB=$!
exec 3<"$DIR/events"

IFS= read -r line <&3 || { echo "no status from device $DEVICE (daemon not running?)" >&2; exit 3; }
case "$line" in
  "$STATUS online"|"$STATUS stopping") ;;
  *) echo "device $DEVICE is not online: ${line#"$STATUS "}" >&2; exit 3 ;;
esac

if [ -n "$AUDIO" ]; then  # the audio file is the payload, the JSON request a user property
  # shellcheck disable=SC2086
  mosquitto_pub -V mqttv5 -h "$HOST" -p "$PORT" $AUTH -i "$NAME-pub-$$" -q 1 -t "$REQ_TOPIC" -f "$AUDIO" \
    -D publish content-type "$MIME" -D publish user-property request "$PAYLOAD" \
    -D publish response-topic "$INBOX" -D publish correlation-data "$RID"
else
  # shellcheck disable=SC2086
  mosquitto_pub -V mqttv5 -h "$HOST" -p "$PORT" $AUTH -i "$NAME-pub-$$" -q 1 -t "$REQ_TOPIC" -m "$PAYLOAD" \
    -D publish response-topic "$INBOX" -D publish correlation-data "$RID"
fi

while IFS= read -r line <&3; do
  topic=${line%% *}
  event=${line#* }
  [ "$topic" = "$INBOX" ] || continue
  if command -v jq >/dev/null 2>&1; then
    printf '%s\n' "$event" | jq -j 'if .type == "delta" then .text
      elif .type == "result" then "\n"
      elif .type == "error" then "error \(.status) \(.code): \(.message)\n" | halt_error(1)
      else empty end'
  else
    printf '%s\n' "$event"
  fi
  case "$event" in
    *'"type":"result"'*) exit 0 ;;
    *'"type":"error"'*) exit 1 ;;
  esac
done
echo "no answer within $TIMEOUT s" >&2
exit 3
