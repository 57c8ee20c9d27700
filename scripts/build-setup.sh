# Sourced by scripts/install, scripts/test and scripts/bench: build_setup compiles the set-up
# interpreter (sandboxd/sandbox/setup/sbd-setup.c) into a static binary beside it, with Debian's
# gcc, when the binary is missing or older than its source. sandboxd refuses to start without it.
build_setup() {
    _source=sandboxd/sandbox/setup/sbd-setup.c
    _binary=sandboxd/sandbox/setup/sbd-setup
    if [ -x "$_binary" ] && [ ! "$_source" -nt "$_binary" ]; then
        return 0
    fi
    install_missing gcc libc6-dev
    echo "building $_binary"
    gcc -std=c11 -O2 -static -Wall -Wextra -Werror -o "$_binary.tmp" "$_source"
    mv "$_binary.tmp" "$_binary"
}
