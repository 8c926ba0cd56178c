#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that torchtitan 0.2.2 needs on the GPU machine and that its
# image lacks (see README.md). They land in <repo>/.wheels/peer/ (git-ignored via /.wheels/), to be carried with
#   run(carry=[".wheels/peer"], ...)
# The GPU image already has torch, triton, numpy, pyarrow, pandas, fsspec, huggingface-hub, requests, urllib3, xxhash,
# tensorboard, protobuf, einops, pillow, rich, typing-extensions, tokenizers, safetensors, tqdm, pyyaml: not fetched.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:-"$ROOT/.wheels/peer"}
mkdir -p "$DEST"

# name==version, all pure-python except multiprocess (a per-Python-version wheel, py312 here).
PINS=(
  torchtitan==0.2.2
  torchdata==0.11.0          # torchtitan.components.dataloader: StatefulDataLoader
  tyro==1.0.17               # torchtitan.config.manager (CLI parsing)
  docstring-parser==0.18.0   # tyro
  typeguard==4.6.1           # tyro
  datasets==5.2.0            # torchtitan.hf_datasets.text_datasets, imported by every model's train spec
  datasets==4.8.5            # fallback that run.sh picks when the GPU machine's pyarrow is older than 24
  dill==0.4.1                # datasets (both versions: dill<0.4.2)
  multiprocess==0.70.19      # datasets (both versions: multiprocess<0.70.20)
)

for pin in "${PINS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" "$pin" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
done

# Fail loudly if a pin did not arrive.
for pin in "${PINS[@]}"; do
  name=${pin%%==*}; ver=${pin##*==}
  file_name=$(echo "$name" | tr '-' '_')
  ls "$DEST"/"${file_name}"-"${ver}"-*.whl >/dev/null 2>&1 || { echo "missing wheel for $pin in $DEST" >&2; exit 1; }
done

ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes ($(du -ch "$DEST"/*.whl | tail -1 | cut -f1))"
