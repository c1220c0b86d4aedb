#!/usr/bin/env bash
# Render an HTML report in headless Chromium and save a PNG screenshot; fails if the page draws nothing.
# usage: scripts/html_screenshot.sh REPORT.html OUT.png [WIDTH HEIGHT]
set -euo pipefail
html="${1:?usage: $0 REPORT.html OUT.png [WIDTH HEIGHT]}"
png="${2:?usage: $0 REPORT.html OUT.png [WIDTH HEIGHT]}"
width="${3:-1200}"
height="${4:-2400}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  echo "no chromium found; install it with: apt-get update && apt-get install -y chromium" >&2
  exit 3
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
abs_html="$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"
mkdir -p "$(dirname "$png")"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size="${width},${height}" --screenshot="$png" "file://${abs_html}" >/dev/null 2>&1
test -s "$png" || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $png"
