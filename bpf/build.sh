#!/bin/sh
# Rebuilds the committed eBPF objects from their C sources:
#   bpf/build.sh            (needs clang, llvm and libbpf-dev)
# Builds bpf/*.bpf.c (the built-in programs) and tests/fixtures/*.bpf.c,
# plus tests/fixtures/counter_v2.bpf.o (the counter with other bytecode).
# Paths are relative so the bytes do not depend on where the checkout lives;
# `tests/bpf_objects.rs` rebuilds into a temporary directory and fails when
# a committed object is stale. `bpf/objects.lock` records the compiler and
# the sources' digests so a machine without clang can still check them.
#
#   bpf/build.sh OUTDIR     writes the objects to OUTDIR instead
set -eu
top="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-}"
arch_include="/usr/include/$(uname -m)-linux-gnu"
compile() { # dir src obj [extra flags]
	dir="$1"; src="$2"; obj="$3"; shift 3
	(cd "$top/$dir" && clang -target bpf -g -O2 -Wall -Werror \
		-I"$top/bpf" -I"$arch_include" "$@" \
		-fdebug-prefix-map="$top=." -fdebug-compilation-dir=. \
		-c "$src" -o "$obj")
	llvm-strip -g "$obj"
}
dest() { # default-dir name
	if [ -n "$out" ]; then echo "$out/$2"; else echo "$top/$1/$2"; fi
}
for src in "$top"/bpf/*.bpf.c; do
	name="$(basename "$src" .c)"
	# The mesh datapath uses atomic exchange and compare-and-swap (BPF ISA v3,
	# kernel >= 5.12); the others stay on the default ISA.
	isa=""
	[ "$name" = mesh.bpf ] && isa="-mcpu=v3"
	compile bpf "$(basename "$src")" "$(dest bpf "$name.o")" $isa
done
for src in "$top"/tests/fixtures/*.bpf.c; do
	name="$(basename "$src" .c)"
	compile tests/fixtures "$(basename "$src")" "$(dest tests/fixtures "$name.o")"
done
compile bpf counter.bpf.c "$(dest tests/fixtures counter_v2.bpf.o)" -DCOUNTER_VARIANT=2
lock="$(dest bpf objects.lock)"
{
	clang --version | head -1
	cd "$top" && sha256sum bpf/bpfsync.h bpf/*.bpf.c tests/fixtures/*.bpf.c
} > "$lock"
