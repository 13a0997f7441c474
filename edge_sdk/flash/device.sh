#!/usr/bin/env bash
# The device side of `make flash`: sent over SSH (bash -s) or run locally, one subcommand a call.
# Every step is idempotent; what it did is printed as `key=value` lines the workstation reads.
#
#   device.sh facts
#   device.sh prepare ROOT ID
#   device.sh package ROOT KEY          (complete | missing)
#   device.sh venv ROOT ID KEY          (wheels already in ROOT/wheels/KEY)
#   device.sh kernel ROOT ID            (the CPU kernels, compiled here)
#   device.sh verify ROOT ID KEY        (the package's hashes, with the release's code)
#   device.sh engines ROOT ID           (edge-sdk compile where a GPU answers)
#   device.sh configure ROOT ID DEVICE_ID PORT
#   device.sh switch ROOT ID
#   device.sh restart ROOT
#   device.sh health ROOT DEVICE_ID PORT TIMEOUT
#   device.sh rollback ROOT
#   device.sh log ROOT JSON_LINE
#   device.sh unflash ROOT
set -euo pipefail

say() { printf '%s=%s\n' "$1" "$2"; }
has_systemd() { [ -d /run/systemd/system ]; }

facts() {
    say uid "$(id -u)"
    say arch "$(uname -m)"
    say hostname "$(hostname)"
    [ -r /etc/nv_tegra_release ] && say l4t_release "$(head -n1 /etc/nv_tegra_release)"
    say l4t_core "$(dpkg-query -W -f='${Version}' nvidia-l4t-core 2>/dev/null || true)"
    local model=""
    for f in /proc/device-tree/model /sys/firmware/devicetree/base/model; do
        [ -r "$f" ] && { model=$(tr -d '\0' < "$f"); break; }
    done
    say model "$model"
    local trt
    trt=$(dpkg-query -W -f='${Version}' tensorrt 2>/dev/null || true)
    if [ -z "$trt" ]; then
        for h in /usr/include/aarch64-linux-gnu/NvInferVersion.h /usr/include/x86_64-linux-gnu/NvInferVersion.h \
                 /usr/include/NvInferVersion.h; do
            [ -r "$h" ] || continue
            trt=$(awk '/#define (NV_TENSORRT|TRT)_(MAJOR|MINOR|PATCH)(_ENTERPRISE)? /{printf "%s%s", sep, $3; sep="."}' "$h")
            break
        done
    fi
    say tensorrt "$trt"
    local cuda=""
    if [ -r /usr/local/cuda/version.json ]; then
        cuda=$(sed -n 's/.*"cuda" *: *{ *"name"[^}]*"version" *: *"\([0-9.]*\)".*/\1/p' /usr/local/cuda/version.json | head -n1)
        [ -n "$cuda" ] || cuda=$(grep -o '"version" *: *"[0-9.]*"' /usr/local/cuda/version.json | head -n1 | grep -o '[0-9.]*$' || true)
    fi
    say cuda "$cuda"
    say nvcc "$( [ -x /usr/local/cuda/bin/nvcc ] && echo yes || echo no)"
    say power_mode "$(nvpmodel -q 2>/dev/null | grep -i 'power mode' | head -n1 | sed 's/.*: *//' || true)"
    say python "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
    say python_venv "$(python3 -c 'import ensurepip, venv' 2>/dev/null && echo yes || echo no)"
    say rsync "$(command -v rsync >/dev/null && echo yes || echo no)"
    say sudo "$( [ "$(id -u)" = 0 ] && echo root || (sudo -n true 2>/dev/null && echo yes || echo no))"
    say mem_total_kb "$(awk '/^MemTotal:/{print $2}' /proc/meminfo)"
    local root=${1:-/opt/edge-sdk}
    local probe=$root
    while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
    say disk_free_bytes "$(df -P -B1 "$probe" | awk 'NR==2{print $4}')"
    say mosquitto "$(command -v mosquitto >/dev/null && echo installed || \
        (apt-cache policy mosquitto 2>/dev/null | grep -q 'Candidate: [0-9]' && echo installable || echo missing))"
    say systemd "$(has_systemd && echo yes || echo no)"
    say current "$(basename "$(readlink "$root/current" 2>/dev/null || echo none)")"
}

prepare() {
    local root=$1 id=$2
    mkdir -p "$root/releases/$id" "$root/packages" "$root/venvs" "$root/wheels" "$root/log" "$root/run"
    say current "$(basename "$(readlink "$root/current" 2>/dev/null || echo none)")"
}

venv() {
    local root=$1 id=$2 key=$3
    local dir="$root/venvs/$key"
    if [ -f "$dir/.complete" ]; then
        say venv reused
    else
        rm -rf "$dir.tmp"
        # JetPack's TensorRT Python bindings live in the system site-packages
        python3 -m venv --system-site-packages "$dir.tmp"
        PIP_CONFIG_FILE=/dev/null "$dir.tmp/bin/pip" install -q --no-index --find-links "$root/wheels/$key" \
            -r "$root/wheels/$key/requirements.txt"
        if [ -x /usr/local/cuda/bin/nvcc ] && ls "$root/wheels/$key"/pycuda-* >/dev/null 2>&1; then
            # pycuda is built here, against this device's CUDA
            PIP_CONFIG_FILE=/dev/null PATH=/usr/local/cuda/bin:$PATH "$dir.tmp/bin/pip" install -q --no-index --find-links "$root/wheels/$key" pycuda
        fi
        touch "$dir.tmp/.complete"
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
        say venv built
    fi
    # the release's code is on the path through its own venv link, not installed into the venv
    local site
    site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$root/current/src" > "$site/edge_sdk_release.pth"
    ln -sfn "../../venvs/$key" "$root/releases/$id/venv"
}

package() {
    local root=$1 key=$2
    say package "$( [ -f "$root/packages/$key/.complete" ] && echo complete || echo missing)"
}

# the release's own code, whatever `current` points at
release_python() { local root=$1 id=$2; shift 2; PYTHONPATH="$root/releases/$id/src" "$root/releases/$id/venv/bin/python" "$@"; }

# The release is source, not an installed wheel: its C kernels are compiled here, by this
# device's compiler, into the release's own tree. Without a compiler the CPU graph runs whole.
kernel() {
    local root=$1 id=$2
    say kernel "$(release_python "$root" "$id" -m edge_sdk.runtime.kernel_build 2>&1 | tail -n1)"
}

verify() {
    local root=$1 id=$2 key=$3
    local dir="$root/packages/$key"
    if [ ! -f "$dir/.complete" ]; then
        release_python "$root" "$id" -m edge_sdk.cli verify "$dir"
        touch "$dir/.complete"
    fi
    ln -sfn "../../packages/$key" "$root/releases/$id/package"
    say verified "$key"
}

engines() {
    local root=$1 id=$2
    if ls /dev/nvidia0 /dev/nvhost-ctrl /dev/nvgpu >/dev/null 2>&1 && \
            release_python "$root" "$id" -c 'import tensorrt' 2>/dev/null; then
        say engines "$(release_python "$root" "$id" -m edge_sdk.cli compile "$root/releases/$id/package" 2>&1 | tail -n1)"
    else
        say engines "not built (no GPU and TensorRT here: the package runs on ONNX Runtime)"
    fi
}

random_secret() { head -c 18 /dev/urandom | base64 | tr -d '/+=\n'; }

configure() {
    local root=$1 id=$2 device_id=$3 port=$4
    local src="$root/releases/$id/src/devices"
    mkdir -p /etc/edge-sdk /etc/mosquitto/conf.d /var/lib/edge-sdk
    id -u edge-sdk >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /var/lib/edge-sdk \
        --shell /usr/sbin/nologin edge-sdk
    # Credentials are made here, on the device, once; nothing secret comes from the repository.
    local made=no
    if [ ! -s /etc/edge-sdk/serve.env ]; then
        (umask 077; printf 'EDGE_SDK_PASSWORD=%s\n' "$(random_secret)" > /etc/edge-sdk/serve.env)
        (umask 077; printf 'CHECK_PASSWORD=%s\n' "$(random_secret)" > /etc/edge-sdk/check.env)
        rm -f /etc/mosquitto/edge-sdk.passwd
        made=yes
    fi
    # shellcheck source=/dev/null
    . /etc/edge-sdk/serve.env
    # shellcheck source=/dev/null
    . /etc/edge-sdk/check.env
    if [ ! -s /etc/mosquitto/edge-sdk.passwd ]; then
        "$src/mosquitto/add_user.sh" /etc/mosquitto/edge-sdk.passwd edge-daemon "$EDGE_SDK_PASSWORD" >/dev/null
        "$src/mosquitto/add_user.sh" /etc/mosquitto/edge-sdk.passwd flash-check "$CHECK_PASSWORD" >/dev/null
    fi
    chmod 600 /etc/edge-sdk/serve.env /etc/edge-sdk/check.env
    chown edge-sdk /etc/edge-sdk/serve.env
    if id -u mosquitto >/dev/null 2>&1; then chown mosquitto /etc/mosquitto/edge-sdk.passwd; fi
    chmod 600 /etc/mosquitto/edge-sdk.passwd
    install -m 644 "$src/mosquitto/edge-sdk.acl" /etc/mosquitto/edge-sdk.acl
    sed "s|^listener 1883 127.0.0.1|listener $port 127.0.0.1|" "$src/mosquitto/edge-sdk.conf" \
        > /etc/mosquitto/conf.d/edge-sdk.conf
    if [ ! -f /etc/edge-sdk/serve.toml ]; then
        sed -e "s|^device_id = .*|device_id = \"$device_id\"|" -e "s|^port = .*|port = $port|" \
            "$src/systemd/serve.toml" > /etc/edge-sdk/serve.toml
    fi
    say credentials "$made"
}

switch() {
    local root=$1 id=$2 old
    old=$(readlink "$root/current" 2>/dev/null || true)
    if [ -n "$old" ] && [ "$(basename "$old")" != "$id" ]; then
        ln -sfn "$old" "$root/.previous.tmp" && mv -Tf "$root/.previous.tmp" "$root/previous"
    fi
    ln -sfn "releases/$id" "$root/.current.tmp" && mv -Tf "$root/.current.tmp" "$root/current"
    say current "$id"
    say previous "$(basename "$(readlink "$root/previous" 2>/dev/null || echo none)")"
}

# -- supervision: systemd where it runs, else a pid file (containers, bring-up images) ------------
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

stop_pid() {
    local file=$1 pid
    alive "$file" || return 0
    pid=$(cat "$file")
    kill -TERM "$pid"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

start_process_daemon() {
    local root=$1 port
    # the broker: edge_sdk's listener, password file and ACL (what systemd's mosquitto loads from conf.d)
    stop_pid "$root/run/mosquitto.pid"
    cat /etc/mosquitto/conf.d/edge-sdk.conf > "$root/run/mosquitto.conf"
    echo "user root" >> "$root/run/mosquitto.conf"
    setsid mosquitto -c "$root/run/mosquitto.conf" >> "$root/log/mosquitto.log" 2>&1 < /dev/null &
    echo $! > "$root/run/mosquitto.pid"
    port=$(awk '/^listener/{print $2; exit}' "$root/run/mosquitto.conf")
    for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    stop_pid "$root/run/edge-sdk.pid"
    (
        set -a
        # shellcheck source=/dev/null
        . /etc/edge-sdk/serve.env
        set +a
        cd /var/lib/edge-sdk
        setsid "$root/current/venv/bin/python" -m edge_sdk.cli serve "$root/current/package" \
            --config /etc/edge-sdk/serve.toml >> "$root/log/daemon.log" 2>&1 < /dev/null &
        echo $! > "$root/run/edge-sdk.pid"
    )
}

restart() {
    local root=$1
    if has_systemd; then
        install -m 644 "$root/current/edge-sdk.service" /etc/systemd/system/edge-sdk.service
        systemctl daemon-reload
        systemctl enable --quiet mosquitto edge-sdk
        systemctl restart mosquitto
        systemctl restart edge-sdk
        say supervisor systemd
    else
        start_process_daemon "$root"
        say supervisor process
    fi
}

health() {
    local root=$1 device_id=$2 port=$3 timeout=$4
    # shellcheck source=/dev/null
    . /etc/edge-sdk/check.env
    CHECK_PASSWORD=$CHECK_PASSWORD "$root/current/venv/bin/python" -m edge_sdk.flash.health \
        --port "$port" --device-id "$device_id" --username flash-check --timeout "$timeout"
}

rollback() {
    local root=$1 prev
    prev=$(readlink "$root/previous" 2>/dev/null || true)
    [ -n "$prev" ] || { echo "rollback: no previous release in $root" >&2; exit 3; }
    ln -sfn "$prev" "$root/.current.tmp" && mv -Tf "$root/.current.tmp" "$root/current"
    rm -f "$root/previous"
    say current "$(basename "$prev")"
}

unflash() {
    local root=$1
    if has_systemd; then
        systemctl disable --now edge-sdk 2>/dev/null || true
        rm -f /etc/systemd/system/edge-sdk.service
        systemctl daemon-reload
    else
        stop_pid "$root/run/edge-sdk.pid"
        stop_pid "$root/run/mosquitto.pid"
    fi
    rm -f /etc/mosquitto/conf.d/edge-sdk.conf /etc/mosquitto/edge-sdk.acl /etc/mosquitto/edge-sdk.passwd
    rm -rf /etc/edge-sdk "$root"
    say removed "$root"
}

cmd=${1:?usage: device.sh SUBCOMMAND ...}
shift
case $cmd in
    facts|prepare|package|venv|kernel|verify|engines|configure|switch|restart|health|rollback|unflash) "$cmd" "$@" ;;
    log) printf '%s\n' "$2" >> "$1/log/releases.log" ;;
    *) echo "device.sh: unknown subcommand $cmd" >&2; exit 2 ;;
esac
