#!/usr/bin/env bash
# Debian programs some tests use, as a user would run them against the server: the browser test plays the
# streamed MP4 in Chromium and in Firefox (which decodes H.264 with the system's libavcodec), the Prometheus
# test scrapes the server with a real Prometheus and runs the alert rules' unit tests with promtool.
# Installs what is missing where apt-get can (as root, as on CI); elsewhere says what is missing, and those
# tests skip, saying so.
set -u

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
command -v firefox-esr >/dev/null 2>&1 || command -v firefox >/dev/null 2>&1 || missing+=(firefox-esr)
have_avcodec() { /sbin/ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so'; }
have_avcodec || missing+=(libavcodec)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq >/dev/null 2>&1; then
    packages=()
    for p in "${missing[@]}"; do
        if [ "$p" = libavcodec ]; then  # its package is named after its ABI: the newest this release has
            for v in 62 61 60 59 58; do
                if apt-cache show "libavcodec$v" 2>/dev/null | grep -q "^Package:"; then packages+=("libavcodec$v"); break; fi
            done
        else
            packages+=("$p")
        fi
    done
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1 && exit 0
fi
echo "not installed: ${missing[*]} (tests/integration/test_browser.py, test_prometheus.py skip without them)"
