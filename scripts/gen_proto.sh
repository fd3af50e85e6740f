#!/usr/bin/env bash
# Generate the Python stubs of every proto/edgeloop/**/*.proto into the contracts package
# (`make proto`). The generated files are committed, so installing needs no protoc.
#
# The proto packages are edgeloop.<area>.v<N> (proto/edgeloop/edge/v1/edge.proto) but the
# Python modules belong to the contracts distribution: edgeloop.contracts.<area>.v<N>.
# protoc derives a module's Python path from the .proto file's path under -I, so it runs
# on a copy of proto/edgeloop laid out as edgeloop/contracts/…, with imports between our
# own protos rewritten the same way. The wire names (package, services, messages) do not
# change; only the Python module path (and the descriptor's file name) does.
#
# Environment: PYTHON (default: .venv/bin/python when present), PROTO_OUT (default
# contracts/src; the tests generate into a temporary directory to check the committed
# stubs are current).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then
  PYTHON=.venv/bin/python
  PATH="$PWD/.venv/bin:$PATH"  # protoc finds its protoc-gen-mypy* plugins on PATH
fi
PYTHON=${PYTHON:-python}
out=${PROTO_OUT:-contracts/src}

if ! "$PYTHON" -c "import grpc_tools.protoc, mypy_protobuf" 2>/dev/null; then
  echo "gen_proto: $PYTHON lacks grpcio-tools or mypy-protobuf (run: make setup)" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/edgeloop/contracts" "$out"
cp -R proto/edgeloop/. "$tmp/edgeloop/contracts/"
find "$tmp" -name '*.proto' -exec \
  sed -i.orig -E 's#^([[:space:]]*import([[:space:]]+(public|weak))?[[:space:]]+")edgeloop/#\1edgeloop/contracts/#' {} +
find "$tmp" -name '*.orig' -delete

protos=$(cd "$tmp" && find edgeloop -name '*.proto' | LC_ALL=C sort)
args=()
for proto in $protos; do args+=("$tmp/$proto"); done  # our proto paths have no spaces
"$PYTHON" -m grpc_tools.protoc -I "$tmp" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  "${args[@]}"

# Packages for the generated modules. Never edgeloop/__init__.py: edgeloop is a namespace
# package shared by every distribution of the workspace.
for proto in $protos; do
  dir=$(dirname "$proto")
  while [[ "$dir" == edgeloop/contracts/* ]]; do
    [[ -e "$out/$dir/__init__.py" ]] || : >"$out/$dir/__init__.py"
    dir=$(dirname "$dir")
  done
  echo "generated $out/${proto%.proto}_pb2{,_grpc}.py{,i}"
done
