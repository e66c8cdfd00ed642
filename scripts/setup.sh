#!/usr/bin/env bash
# Create .venv (if missing) and install crystal-locator with what the README's commands need (the test
# extras). `--dev` adds the developer tools (ruff). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="test"
for arg in "$@"; do
    case "$arg" in
        --dev) EXTRAS="dev" ;;
        -h|--help) echo "usage: scripts/setup.sh [--dev]   (--dev: also ruff)"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (use --dev or nothing)" >&2; exit 2 ;;
    esac
done
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# setuptools warns on every editable install that a folder named like a package would shadow it; here that
# folder is the package itself (the source tree is what is installed), so the warning says nothing
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
