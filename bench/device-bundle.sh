#!/usr/bin/env bash
# Bundles the release sluice binary and the Debian binaries the scaling benchmark drives
# (haproxy, redis-server, redis-benchmark, iperf3) with their shared libraries and this
# machine's dynamic loader into bench/device-bin/ (git-ignored), so that bench/scaling.sh can
# run on a lent machine that has none of them installed and no network.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/device-bin
rm -rf "$out"; mkdir -p "$out/lib" "$out/real"
cargo build --release --locked -p sluice
loader=$(ldd /bin/true | awk '/ld-linux/ {print $1}')
cp -L "$loader" "$out/lib/"
loader_name=$(basename "$loader")
for bin in target/release/sluice /usr/sbin/haproxy /usr/bin/redis-server /usr/bin/redis-benchmark /usr/bin/redis-cli /usr/bin/iperf3; do
  name=$(basename "$bin")
  cp -L "$bin" "$out/real/$name"
  ldd "$bin" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do cp -Ln "$lib" "$out/lib/"; done
  cat > "$out/$name" <<WRAP
#!/bin/sh
here=\$(cd "\$(dirname "\$0")" && pwd)
exec "\$here/lib/$loader_name" --library-path "\$here/lib" "\$here/real/$name" "\$@"
WRAP
  chmod +x "$out/$name"
done
du -sh "$out"
