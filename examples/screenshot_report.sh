#!/usr/bin/env bash
# Render an audit directory's report.html headless and save a PNG of it, to look at the page
# as a reader would.  Usage: examples/screenshot_report.sh AUDIT_DIR [OUT.png] [WIDTHxHEIGHT]
# Needs Chromium (Debian: apt-get install -y chromium). The page loads nothing from the network.
set -euo pipefail
dir=${1:?usage: $0 AUDIT_DIR [OUT.png] [WIDTHxHEIGHT]}
out=${2:-$dir/report.png}
size=${3:-1280x2000}
html=$(realpath "$dir/report.html")
[ -f "$html" ] || { echo "$0: $dir has no report.html (run: gradaudit report $dir)" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) || {
    echo "$0: no chromium found; on Debian: apt-get install -y chromium" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$profile" --screenshot="$(realpath -m "$out")" \
    --window-size="${size/x/,}" "file://$html" 2>/dev/null
echo "$out"
