#!/usr/bin/env bash
# Installs the Azure SDK for Python, pinned in requirements.txt, into a virtual environment in a
# cache folder, for the conformance suite (tests/conformance.rs). Prints the environment's python.
# Idempotent: an environment made from the same requirements is reused.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# Without a home (an empty or unset HOME, as some CI runners and containers have) the cache
# goes under the repository's own target folder rather than `/.cache`.
if [[ -n "${XDG_CACHE_HOME:-}" ]]; then
    base="$XDG_CACHE_HOME"
elif [[ -n "${HOME:-}" ]]; then
    base="$HOME/.cache"
else
    base="$here/../target"
fi
cache="${KMSFLOW_PYTHON_CACHE:-$base/kmsflow/python-sdk}"
stamp="$cache/requirements.sha256"
wanted="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ -x "$cache/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "$cache/bin/python"
    exit 0
fi
python="$(command -v python3 || true)"
if [[ -z "$python" ]]; then
    echo "conformance: python3 is needed for the Azure SDK conformance suite" >&2
    exit 1
fi
rm -rf "$cache"
mkdir -p "$(dirname "$cache")"
"$python" -m venv "$cache" >&2
"$cache/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
echo "$wanted" > "$stamp"
echo "$cache/bin/python"
