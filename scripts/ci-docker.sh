#!/usr/bin/env bash
# Give CI (or a fresh machine) a working Docker engine for the compose tests, and take it away.
#
#   scripts/ci-docker.sh start   install docker.io, docker-compose and debootstrap from Debian
#                                when missing; start dockerd in the background unless an engine
#                                already answers; wait until `docker info` works
#   scripts/ci-docker.sh stop    stop the dockerd that `start` started, and nothing else
#
# Why: these machines ship only the Docker client (shared/DESIGN.md §7). `stop` recognises
# its own dockerd by the pid *and* the kernel start time recorded in a pidfile, so a reused
# pid or an engine somebody else runs is never touched. Needs root (CI runs as root).
set -euo pipefail

state_dir=${DPUMESH_DOCKER_STATE:-/run/dpumesh-ci-docker}
pidfile=$state_dir/dockerd.pid
logfile=$state_dir/dockerd.log
wait_s=${DPUMESH_DOCKER_WAIT_S:-90}

say() { echo "ci-docker: $*" >&2; }

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

# Fields of /proc/<pid>/stat after the command name: 1 = state, 20 = start time in clock
# ticks since boot (with the pid, unique to one process).
stat_field() { awk -v f="$2" '{ sub(/^.*\) /, ""); print $f }' "/proc/$1/stat" 2>/dev/null; }
start_time() { stat_field "$1" 20; }
# Alive and not a zombie (an exited dockerd may wait a moment to be reaped by init).
alive() { local s; s=$(stat_field "$1" 1) && [ -n "$s" ] && [ "$s" != Z ]; }

install_missing() {
    local packages=()
    command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
        || packages+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || packages+=(debootstrap)
    if [ "${#packages[@]}" -eq 0 ]; then
        return
    fi
    if [ "$(id -u)" -ne 0 ]; then
        say "need root to install: ${packages[*]}"
        exit 1
    fi
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${packages[@]}"
}

ours() {
    # Prints our dockerd's pid if the pidfile names a live process with the recorded start time.
    [ -f "$pidfile" ] || return 1
    local pid started
    read -r pid started <"$pidfile"
    [ -n "$pid" ] && [ "$(start_time "$pid")" = "$started" ] || return 1
    echo "$pid"
}

start() {
    install_missing
    if engine_answers; then
        say "a Docker engine already answers; using it"
        return
    fi
    if pid=$(ours); then
        say "dockerd $pid (ours) is running but not answering; see $logfile"
        exit 1
    fi
    mkdir -p "$state_dir"
    say "starting dockerd (log $logfile)"
    # setsid: its own session, so a terminal's Ctrl-C or the caller's exit does not hit it.
    # --userland-proxy=false: published ports are forwarded by the kernel (iptables), not by a
    # docker-proxy process per port whose CPU no stack role would account for.
    setsid dockerd --userland-proxy=false >"$logfile" 2>&1 </dev/null &
    pid=$!
    echo "$pid $(start_time "$pid")" >"$pidfile"
    for _ in $(seq "$wait_s"); do
        if engine_answers; then
            say "dockerd $pid ready"
            return
        fi
        if ! alive "$pid"; then
            say "dockerd exited; last log lines:"
            tail -n 30 "$logfile" >&2
            rm -f "$pidfile"
            exit 1
        fi
        sleep 1
    done
    say "dockerd not answering after ${wait_s} s; last log lines:"
    tail -n 30 "$logfile" >&2
    stop
    exit 1
}

stop() {
    local pid
    if ! pid=$(ours); then
        say "no dockerd started by this script is running; nothing to stop"
        rm -f "$pidfile"
        return
    fi
    say "stopping dockerd $pid"
    kill -TERM "$pid"
    for _ in $(seq 60); do
        alive "$pid" || break
        sleep 0.5
    done
    if alive "$pid"; then
        say "dockerd $pid still running after 30 s; killing it"
        kill -KILL "$pid"
    fi
    rm -f "$pidfile"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
