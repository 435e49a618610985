#!/usr/bin/env bash
# Builds the test-only binaries in tests/sca/data/bin from the C sources next to this script.
# They are committed; rebuild them only when a source changes. Nothing here runs them: the
# hostile service runs only inside herdwall's emulator, the others are only parsed.
#
#   bin/hostile          static -nostdlib x86-64 service that misbehaves on request
#   bin/exit-at-boot     static x86-64 program that exits before any receive
#   bin/bigbss           static x86-64 service that writes every page of a 4 MiB .bss buffer
#   bin/snippet          static x86-64 service: straight-line data movement (a Triton oracle)
#   bin/dynamic          dynamically linked x86-64 program (glibc)
#   bin/pie              static-pie x86-64 program
#   bin/i386             static 32-bit program (needs gcc multilib; skipped if missing)
set -euo pipefail

cd "$(dirname "$0")"
CC=${CC:-gcc}
COMMON=(-fno-stack-protector -Wall -Wextra -O1 -fno-builtin -ffile-prefix-map="$PWD"=.
    -Wl,--build-id=none)
mkdir -p bin

"$CC" "${COMMON[@]}" -static -no-pie -nostdlib -o bin/hostile hostile.c
"$CC" "${COMMON[@]}" -static -no-pie -nostdlib -o bin/exit-at-boot refused.c
"$CC" "${COMMON[@]}" -static -no-pie -nostdlib -o bin/snippet snippet.S
"$CC" "${COMMON[@]}" -static -no-pie -nostdlib -DBIG=$((4 << 20)) -o bin/bigbss bigbss.S
"$CC" "${COMMON[@]}" -no-pie -DWITH_LIBC -o bin/dynamic refused.c
"$CC" "${COMMON[@]}" -static-pie -nostdlib -o bin/pie refused.c
if "$CC" -m32 "${COMMON[@]}" -static -nostdlib -o bin/i386 refused.c 2>/dev/null; then
    :
else
    echo "warning: no 32-bit gcc support; bin/i386 not rebuilt" >&2
fi
strip --strip-unneeded bin/dynamic bin/pie bin/i386 2>/dev/null || true
sha256sum bin/*
