# Sourced by run.sh and test.sh: make .venv and install the project into it (extras in $1),
# again only when pyproject.toml changed. Needs nothing but python3 with venv and pip.
_extras=${1:-}
_stamp=.venv/.installed${_extras:+-$_extras}
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f "$_stamp" ] || [ pyproject.toml -nt "$_stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".${_extras:+[$_extras]}"
    touch "$_stamp"
fi
