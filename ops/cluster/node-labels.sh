#!/bin/sh
# Writes this machine's Ray labels and resources from a raymta node map (regions-*.conf), for
# `ray start --labels-file=... --resources=...` in cluster.yaml / cluster-onprem.yaml.
#   node-labels.sh MAP [OUT_DIR [IP]]
# OUT_DIR defaults to /etc/raymta; IP to this machine's first address (hostname -I). Fails,
# naming the address, when the map has no line for it: a node without a region would let
# queue copies share a region.
set -eu
map=$1
out=${2:-/etc/raymta}
ip=${3:-$(hostname -I | awk '{print $1}')}
line=$(awk -v ip="$ip" '$1 == ip && $1 !~ /^#/ {print; exit}' "$map")
if [ -z "$line" ]; then
    echo "node-labels.sh: $ip is not in $map: add a line for it (region, role, egress)" >&2
    exit 1
fi
set -- $line
region=$2 role=$3 egress=$4 ehlo=$5 ingress=$6
mkdir -p "$out"
{
    echo "region: \"$region\""
    echo "raymta.io/role: \"$role\""
    [ "$egress" = "-" ] || echo "raymta.io/egress-ip: \"$egress\""
    [ "$ehlo" = "-" ] || echo "raymta.io/ehlo: \"$ehlo\""
    [ "$ingress" = "-" ] || echo "raymta.io/ingress: \"$ingress\""
} > "$out/ray-labels.yaml"
echo "{\"region:$region\": 1}" > "$out/ray-resources.json"
echo "$region" > "$out/region"
cat "$out/ray-labels.yaml"
