#!/usr/bin/env bash
# Add (or change) a broker user for edge_sdk: the username becomes the client name C in every
# topic (edge/v1/<device>/req/C/..., edge/v1/clients/C/...), so it must be one topic level.
#
#   devices/mosquitto/add_user.sh PASSWORD_FILE USERNAME [PASSWORD]   (no PASSWORD: asked for)
set -euo pipefail
FILE=${1:?usage: add_user.sh PASSWORD_FILE USERNAME [PASSWORD]}
NAME=${2:?usage: add_user.sh PASSWORD_FILE USERNAME [PASSWORD]}
if ! [[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]]; then
    echo "add_user.sh: username '$NAME' is not a single topic level: use [A-Za-z0-9][A-Za-z0-9_-]* (max 64);" \
         "'+', '#', '/', '\$' and spaces would change what the ACL grants" >&2
    exit 2
fi
CREATE=()
[ -f "$FILE" ] || CREATE=(-c)
if [ $# -ge 3 ]; then
    mosquitto_passwd "${CREATE[@]}" -b "$FILE" "$NAME" "$3"
else
    mosquitto_passwd "${CREATE[@]}" "$FILE" "$NAME"
fi
