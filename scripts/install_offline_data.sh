#!/usr/bin/env bash
# Installs the offline datasets the default benchmark and the tests use:
# Fashion-MNIST from Debian's `dataset-fashion-mnist` (IDX files under
# /usr/share/datasets/fashion-mnist). Animal-MNIST comes from PyPI and
# scikit-learn's digits are bundled with scikit-learn (see the Makefile).
set -euo pipefail
FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST: found in $FMNIST_DIR"
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
else
    echo "Fashion-MNIST not installed: run 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu)," >&2
    echo "or put torchvision's FashionMNIST/raw files under \$CL_MERGE_DATA." >&2
fi
