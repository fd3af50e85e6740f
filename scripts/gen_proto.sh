#!/usr/bin/env bash
# Generate the Python gRPC stubs of proto/ into the contracts package.
# The proto package is edgeloop.edge.v1; the stubs live at edgeloop.contracts.edge.v1, so
# protoc runs on a copy laid out as edgeloop/contracts/edge/v1/edge.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/edgeloop/contracts/edge/v1"
cp proto/edgeloop/edge/v1/edge.proto "$tmp/edgeloop/contracts/edge/v1/edge.proto"
out=contracts/src
python -m grpc_tools.protoc -I "$tmp" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$tmp/edgeloop/contracts/edge/v1/edge.proto"
touch "$out/edgeloop/contracts/edge/__init__.py" "$out/edgeloop/contracts/edge/v1/__init__.py"
echo "generated $out/edgeloop/contracts/edge/v1/edge_pb2*.py"
