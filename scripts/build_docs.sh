#!/usr/bin/env bash
# Build the documentation site (mkdocs.yml) into build/site with warnings as errors: a broken
# link or anchor, or a page missing from the nav, fails. Installs the `docs` extra into .venv
# if mkdocs is not there yet.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! .venv/bin/python -c "import mkdocs" 2>/dev/null; then
    .venv/bin/python -m pip install -q -e '.[docs]'
fi
exec .venv/bin/mkdocs build --strict --quiet --site-dir build/site "$@"
