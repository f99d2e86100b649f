#!/usr/bin/env bash
# Build the wheels that benchmarks/gpu_suite.sh needs on a GPU machine without them (and without internet):
# MONAI, pytorch-ignite and python-fire (with termcolor) for the machine's Python 3.12, at the versions installed
# here, into .whl/ at the repository root (ignored by git). Carry .whl with the run; gpu_suite.sh installs them.
#
#   bash benchmarks/device_wheels.sh            # into .whl/
#   bash benchmarks/device_wheels.sh DIR        # elsewhere
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$REPO/.whl}
PY=${PYTHON:-python3}
PACKAGES=(monai pytorch-ignite fire termcolor)

mkdir -p "$DEST"
exclude=$(git -C "$REPO" rev-parse --git-common-dir 2>/dev/null)/info/exclude || true
if [[ "$DEST" == "$REPO/.whl" && -n "$exclude" && -d "$(dirname "$exclude")" ]]; then
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
fi
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || {
        echo "device_wheels.sh: $name is not installed here; install the project first (README.md)." >&2
        exit 1
    }
    rm -f "$DEST"/"${name//-/_}"-*.whl "$DEST"/"$name"-*.whl  # one version of each: two stop the install there
    # a wheel for CPython 3.12 on x86-64 Linux (these are pure Python: py3-none-any), else build one from source
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DEST" "$name==$version"; then
        "$PY" -m pip wheel -q --no-deps -w "$DEST" "$name==$version"
    fi
done
ls -l "$DEST"
echo "carry '.whl' with the run; benchmarks/gpu_suite.sh installs what is in it (no index, no dependencies)."
