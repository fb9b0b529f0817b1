#!/usr/bin/env bash
# Local runner: sets up a virtualenv with the pinned dependencies (once, and again whenever
# setup.cfg changes), then runs one of
#   demo [flags]   the main job on the real stories260K model (configs/stories260k.py)
#   test [args]    the test suite (pytest; slow studies are skipped unless -m slow)
#   run  [args]    python -m xecomla.main with your own flags
#   python [args]  the virtualenv's python
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${XECOMLA_VENV:-.venv}"
stamp="$venv/.xecomla-setup"
want="$(sha256sum setup.cfg | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $venv (pinned dependencies from setup.cfg; about a minute)..." >&2
  python3 -m venv "$venv"
  # pip's output (progress, notices, the editable install's warnings) goes to a log file, shown
  # only when the install fails.
  log="$venv/pip-install.log"
  if ! { "$venv/bin/python" -m pip install --upgrade pip \
         && "$venv/bin/python" -m pip install -e ".[test]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "error: installing the dependencies failed (pip's last lines above, all of them in" \
         "$log): fix what pip names and rerun" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo "set up $venv in ${SECONDS} s (pip's log: $log)" >&2
fi
# The test extra brings libtpu (for ahead-of-time TPU compiles); on a machine without an
# accelerator, keep jax on the CPU so that it does not probe for a TPU at start-up.
if [ -z "${JAX_PLATFORMS+x}" ] && ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1 \
    && ! command -v nvidia-smi >/dev/null 2>&1; then
  export JAX_PLATFORMS=cpu
fi
py="$venv/bin/python"
cmd="${1:-}"
shift || true
case "$cmd" in
  demo) exec "$py" -m xecomla.main --config=configs/stories260k.py --workdir=runs/demo "$@" ;;
  test) exec "$py" -m pytest "$@" ;;
  run) exec "$py" -m xecomla.main "$@" ;;
  python) exec "$py" "$@" ;;
  *) echo "usage: bash launch/local.sh demo|test|run|python [args]" >&2; exit 2 ;;
esac
