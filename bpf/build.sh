#!/bin/sh
# Rebuilds the committed eBPF objects from their C sources:
#   bpf/build.sh            (needs clang and libbpf-dev)
# Objects are built with paths relative to bpf/ so the bytes do not depend
# on where the checkout lives; `tests/bpf_objects.rs` rebuilds them into a
# temporary directory and fails when a committed object is stale.
set -eu
cd "$(dirname "$0")"
out="${1:-.}"
arch_include="/usr/include/$(uname -m)-linux-gnu"
for src in *.bpf.c; do
	obj="$out/${src%.c}.o"
	clang -target bpf -g -O2 -Wall -Werror \
		-I. -I"$arch_include" \
		-fdebug-prefix-map="$(pwd)=." -fdebug-compilation-dir=. \
		-c "$src" -o "$obj"
	# Strip DWARF but keep BTF: smaller objects, same loadable content.
	llvm-strip -g "$obj" 2>/dev/null || true
done
# Record the compiler and the sources' digest so a machine without clang can
# still tell that objects and sources belong together.
{
	clang --version | head -1
	sha256sum bpfsync.h *.bpf.c
} > "$out/objects.lock"
