#!/usr/bin/env bash
# Installs the Debian packages that Sluice's tests and benchmarks drive: real servers and clients
# (redis-server, redis-benchmark, PostgreSQL for the health probes, dnsmasq, dig and dnsperf for
# UDP, iperf3, socat), the balancers we compare against (HAProxy, nginx with its stream
# module), and what the fault tests stage faults with (iproute2 and nftables: a network
# namespace whose traffic is blackholed; util-linux's setpriv and prlimit: a low fd limit that
# cannot be raised). Idempotent; needs root (or sudo).
set -euo pipefail
pkgs=(redis-server redis-tools postgresql dnsmasq bind9-dnsutils dnsperf iperf3 socat haproxy nginx-light libnginx-mod-stream procps iproute2 nftables util-linux curl python3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The packages start their services on install; the tests start their own instances.
for svc in redis-server postgresql dnsmasq nginx haproxy; do
  $sudo systemctl stop "$svc" 2>/dev/null || $sudo service "$svc" stop 2>/dev/null || true
done
echo "install-deps: installed ${missing[*]}"
