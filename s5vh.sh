#!/usr/bin/env bash
# The demo and the tests on a fresh machine, one command each, set-up included:
#   bash s5vh.sh demo [ARGS]   install what is missing into .venv from requirements.txt, then
#                              train the demo and print its table (ARGS go to train.py)
#   bash s5vh.sh test [ARGS]   the same from requirements-test.txt, then the test suite (ARGS go
#                              to pytest)
#   bash s5vh.sh lock          re-resolve the newest versions pyproject.toml allows into both
#                              lock files (torch kept at the pinned version)
# A second call finds .venv matching the lock files and starts at once. PYTHON picks the
# interpreter (default: python3; 3.11 or newer for the locked versions). Plain pip and venv,
# because they are on every machine with Python and read the lock files as they are.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
venv=.venv
cpu_index=https://download.pytorch.org/whl/cpu

torch_source() {
    # On a machine without an NVIDIA GPU that reaches PyTorch's CPU index, take torch from there
    # (a few hundred MB instead of several GB of CUDA wheels); a short timeout, so a machine that
    # reaches only PyPI does not wait.
    if command -v nvidia-smi > /dev/null 2>&1; then return; fi
    if "$python" -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=5)" \
            > /dev/null 2>&1; then
        echo "--extra-index-url $cpu_index"
    fi
}

ensure_env() {   # $1: the lock file the environment must match
    local lock=$1 stamp want
    stamp=$venv/.installed-$(basename "$lock" .txt)
    want=$(cat "$lock" requirements.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    [ -x $venv/bin/python ] || "$python" -m venv $venv
    echo "setting up $venv from $lock (once) ..."
    $venv/bin/python -m pip install -qq --disable-pip-version-check $(torch_source) -r "$lock"
    echo "$want" > "$stamp"
}

lock() {
    local fresh
    fresh=$(mktemp -d)
    "$python" -m venv "$fresh"
    local pip="$fresh/bin/python -m pip install -qq --disable-pip-version-check"
    local torch_pin
    torch_pin=$(grep -E '^torch==' requirements.txt)
    $pip $(torch_source) "$torch_pin" -e .
    freeze() { "$fresh/bin/python" -m pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$//'; }
    { echo "# core dependencies of pyproject.toml, pinned (bash s5vh.sh lock)"; freeze; } \
        > requirements.txt.new
    $pip $(torch_source) "$torch_pin" -e ".[test]"
    { echo "# the test extra, pinned on top of requirements.txt (bash s5vh.sh lock)"
      echo "-r requirements.txt"
      freeze | grep -vxFf <(grep -v '^#' requirements.txt.new); } > requirements-test.txt
    mv requirements.txt.new requirements.txt
    rm -rf "$fresh"
}

case "${1:-}" in
    demo)
        shift
        ensure_env requirements.txt
        exec $venv/bin/python train.py --config configs/S5VH/demo.py --bits 16 32 64 \
            --compare lsh itq --replace "$@" ;;
    test)
        shift
        ensure_env requirements-test.txt
        exec $venv/bin/python -m pytest -q "$@" ;;
    lock)
        lock ;;
    *)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
        exit 2 ;;
esac
