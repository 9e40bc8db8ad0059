#!/usr/bin/env bash
# Shared setup for quickstart.sh and test.sh: a virtualenv with the project installed, and the
# Debian packages the project uses (emoji names for the demo corpus, Chromium for browser tests).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"

need_apt=()
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || need_apt+=(unicode-data)
# emoji artwork of `agile demo-corpus --kind emoji-mix`: Noto Color Emoji (OFL) and Symbola
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need_apt+=(fonts-noto-color-emoji)
[ -f /usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf ] || need_apt+=(fonts-symbola)
if [ "${AGILE_WITH_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.agile-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing the project and its dependencies (first run: a few minutes)"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # pip's local-index notices and setuptools' boxed "Editable installation" note are not
  # problems: keep them out of a newcomer's way (errors still print, and fail the step)
  python -m pip install -q -e '.[dev]' 2>&1 | awk '
    /is ignored: it is neither a file nor a directory/ { next }
    /BuildBackendWarning: Editable installation/ { skip = 1; next }
    skip && /with strategy, WheelFile/ { skip = 0; next }
    !skip { print }'
  touch "$stamp"
fi
export AGILE_HOME="${AGILE_HOME:-$ROOT/.agile}"
export DAGSTER_HOME="${DAGSTER_HOME:-$ROOT/dagster_home}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
