#!/usr/bin/env bash
# The Debian packages the tests need beyond a stock machine: buildah and mmdebstrap build the
# images (make images); containerd, runc, the CNI plugins and iptables run the test cluster's
# real node (tests/cluster/node.py). Installs only what is missing; needs root and apt.
set -euo pipefail
packages=(buildah mmdebstrap containerd runc containernetworking-plugins iptables uidmap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "host packages: all present"
  exit 0
fi
start=$SECONDS
echo "host packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "host packages: installed in $((SECONDS - start)) s"
