#!/usr/bin/env bash
# Install check: build the mmalign wheel, install it (not editable) into a fresh virtual
# environment outside the checkout, and from an empty directory outside the checkout run
#   mmalign --help;  mmalign score --list;  mmalign sample on the bundled toy model.
# Catches a subpackage or data file missing from the wheel, which the editable install used
# by the test suite cannot see. Run by .ci/run; about 2-3 minutes (pip reuses its cache).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/mmalign-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
step() { echo "check_wheel: $*"; }

step "building the wheel"
if ! "$repo/.venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$repo" >"$work/build.log" 2>&1; then
  cat "$work/build.log" >&2; fail "pip wheel could not build mmalign"
fi
whl=$(ls "$work"/dist/mmalign-*.whl 2>/dev/null | head -n1)
[ -n "$whl" ] || fail "no mmalign-*.whl in $work/dist"

# every package directory and every toy asset of the checkout must be in the wheel
listing=$("$repo/.venv/bin/python" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$whl")
for init in $(find mmalign rewards pipelines -name __init__.py | sort); do
  case $init in rewards/*) want=mmalign/$init ;; pipelines/*) want=mmalign/$init ;; *) want=$init ;; esac
  grep -qxF "$want" <<<"$listing" || fail "$init is not in the wheel as $want (package discovery in setup.py)"
done
for asset in $(find mmalign/toy/assets -type f | sort); do
  grep -qxF "$asset" <<<"$listing" || fail "toy asset $asset is not in the wheel (package-data in pyproject.toml)"
done
step "$(basename "$whl"): $(wc -l <<<"$listing") files, every package and toy asset present"

step "installing it into a fresh venv ($work/venv)"
"$PY" -m venv "$work/venv"
# plain pip (on this machine a pip constraint keeps torch at the local build); --no-compile:
# skip byte-compiling the ~5 GB of dependencies (not needed to run them; a large part of the time)
if ! "$work/venv/bin/python" -m pip install -q --no-compile "$whl" >"$work/install.log" 2>&1; then
  cat "$work/install.log" >&2; fail "pip install of the wheel into a fresh venv"
fi

mkdir "$work/run" && cd "$work/run"  # outside the checkout: only the installed package is importable
where=$("$work/venv/bin/python" -c 'import mmalign, os; print(os.path.dirname(mmalign.__file__))')
case $where in "$work/venv/"*) ;; *) fail "mmalign imports from $where, not from the fresh venv" ;; esac
mm=$work/venv/bin/mmalign

step "mmalign --help"
"$mm" --help >"$work/help.txt" 2>&1 || { cat "$work/help.txt" >&2; fail "mmalign --help exited non-zero"; }
grep -q "sample" "$work/help.txt" || fail "mmalign --help does not list the sample command"

step "mmalign score --list"
"$mm" score --list >"$work/list.txt" 2>&1 || { cat "$work/list.txt" >&2; fail "mmalign score --list exited non-zero"; }
grep -q "^clip " "$work/list.txt" || { cat "$work/list.txt" >&2; fail "mmalign score --list does not list the clip reward"; }

step "mmalign sample --model toy:sd_toy"
"$mm" sample --model toy:sd_toy --prompt "a red circle" --n 2 --steps 4 --device cpu --out "$work/run/samples" \
  >"$work/sample.txt" 2>&1 || { cat "$work/sample.txt" >&2; fail "mmalign sample on toy:sd_toy exited non-zero"; }
for f in 0000_00.png 0000_01.png grid.png samples.jsonl; do
  [ -s "$work/run/samples/$f" ] || { cat "$work/sample.txt" >&2; fail "mmalign sample did not write samples/$f"; }
done

step "ok (wheel installs and runs outside the checkout)"
