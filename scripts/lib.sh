# shellcheck shell=bash
# Shared helpers for scripts/setup, scripts/services and scripts/test.
# Source it; it defines variables and functions and runs nothing else.

# Repository root, from this file's own location.
BAKE_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
# Cache outside the checkout: the test venv and cargo's target dir live here.
BAKE_CACHE=${BAKE_CACHE:-/var/cache/bake}
BAKE_REQUIREMENTS="$BAKE_ROOT/scripts/requirements-test.txt"
# Written last by scripts/setup, so an interrupted install is redone.
BAKE_VENV_MARKER=.bake-setup-complete

# Debian packages the tests need (shellcheck is for development only).
# shellcheck disable=SC2034 # used by scripts/setup
BAKE_APT_PACKAGES=(
	apache2-utils   # htpasswd, for the registry with basic auth
	busybox-static  # a static root filesystem for the namespace runner's tests
	ca-certificates
	curl            # readiness checks in scripts/services
	docker-registry # an OCI registry (distribution 2.8)
	docker.io
	mmdebstrap
	openssl
	python3-venv
	skopeo
	umoci
	zstd            # an independent decoder for zstd layers (zstd -t)
)

bake_say() {
	printf 'scripts/%s: %s\n' "${0##*/}" "$*" >&2
}

bake_die() {
	bake_say "error: $*"
	exit 1
}

# The venv for the AWS emulator, keyed by the content of requirements-test.txt.
bake_venv_dir() {
	local sum
	sum=$(sha256sum -- "$BAKE_REQUIREMENTS") || return 1
	printf '%s/venv-%s\n' "$BAKE_CACHE" "${sum:0:12}"
}

# True when the venv at $1 was fully installed and its interpreter still runs.
bake_venv_ready() {
	[[ -f "$1/$BAKE_VENV_MARKER" && -x "$1/bin/python" && -x "$1/bin/moto_server" ]]
}

# Prints N distinct free TCP ports on 127.0.0.1, one a line. All sockets are
# held open together, so the ports differ from each other.
bake_free_ports() {
	python3 - "$1" <<-'EOF'
		import socket, sys
		socks = []
		for _ in range(int(sys.argv[1])):
		    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
		    s.bind(("127.0.0.1", 0))
		    socks.append(s)
		for s in socks:
		    print(s.getsockname()[1])
		for s in socks:
		    s.close()
	EOF
}
