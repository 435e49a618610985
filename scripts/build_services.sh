#!/usr/bin/env bash
# Rebuilds the sample vulnerable services in sca/services/<name>/bin/<name>, byte for byte
# wherever gcc and glibc are the same (fixed flags, no build id, no paths, no timestamps), and
# prints the SHA-256 of each binary (a service image's id is that hash).
#
#   scripts/build_services.sh           rebuild the committed binaries in place
#   scripts/build_services.sh --check   rebuild into a temporary directory and compare with the
#                                       committed binaries; exit 1 on any difference
#
# Building never runs a service: they are deliberately vulnerable and are only ever executed
# inside herdwall's emulator (sca/emu).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CC=${CC:-gcc}

check=0
case "${1:-}" in
--check) check=1 ;;
"") ;;
*)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac

# Shared by every service: reproducible output, nothing that varies between machines or runs.
COMMON=(-static -no-pie -fno-stack-protector -Wall -Wextra
    -ffile-prefix-map="$ROOT"=. -Wl,--build-id=none)

# Per-service flags. resolver is freestanding (own _start, syscall stubs and strcpy);
# the others link glibc statically so its ifunc-selected string routines run.
flags_for() {
    case "$1" in
    resolver) echo "-nostdlib -O1 -fno-builtin" ;;
    httpd | rpcd | mgmtd) echo "-O2" ;;
    *)
        echo "unknown service $1" >&2
        return 1
        ;;
    esac
}

SERVICES=(resolver httpd rpcd mgmtd)

if ! printf 'int main(void){return 0;}\n' | "$CC" -static -x c -o /dev/null - 2>/dev/null; then
    echo "error: '$CC -static' does not link; install glibc's static libraries (libc6-dev)" >&2
    exit 2
fi

out_root=$ROOT/sca/services
if ((check)); then
    out_root=$(mktemp -d)
    trap 'rm -rf "$out_root"' EXIT
fi

status=0
for name in "${SERVICES[@]}"; do
    src=sca/services/$name/$name.c # relative, so no absolute path reaches the binary
    out=$out_root/$name/bin/$name
    mkdir -p "$(dirname "$out")"
    # shellcheck disable=SC2046  # the per-service flags are meant to split into words
    "$CC" "${COMMON[@]}" $(flags_for "$name") -o "$out" "$src"
    hash=$(sha256sum "$out" | cut -d' ' -f1)
    if ((check)); then
        committed=sca/services/$name/bin/$name
        if [[ ! -f $committed ]]; then
            echo "MISSING $name  $committed"
            status=1
        elif cmp -s "$out" "$committed"; then
            echo "ok      $name  $hash"
        else
            echo "DIFFERS $name  built $hash, committed $(sha256sum "$committed" | cut -d' ' -f1)"
            status=1
        fi
    else
        echo "$hash  sca/services/$name/bin/$name"
    fi
done
exit $status
