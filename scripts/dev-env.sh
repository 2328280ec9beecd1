# Source this to build and test by hand with the same settings as the Makefile:
#   . scripts/dev-env.sh && cargo test --lib pipeline
RIL_HOME="${RIL_HOME:-$HOME/.cache/ril-pipe}"
export RIL_HOME
export VIRTUAL_ENV="$RIL_HOME/venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$RIL_HOME/target}"
export RIL_FIXTURES="${RIL_FIXTURES:-$RIL_HOME/fixtures}"
