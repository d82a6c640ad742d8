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
	apt-utils       # apt-ftparchive: the local package archive of the fleet tests
	busybox-static  # a static root filesystem for the namespace runner's tests
	ca-certificates
	curl            # readiness checks in scripts/services
	debian-security-support # check-support-status, for the compliance gate
	docker-registry # an OCI registry (distribution 2.8)
	docker.io
	dosfstools      # mkfs.vfat: the EFI system partition of AMI disk images
	e2fsprogs       # mkfs.ext4 -d: the root filesystem of AMI disk images
	fdisk           # sfdisk, to inspect disk images in tests
	gpg             # signs the fleet tests' local package archive
	mmdebstrap
	mtools          # writing the EFI system partition without mounting it
	openscap-scanner # oscap, the compliance gate's scanner
	openssh-client  # ssh-keygen, for the builder-instance strategy's tests
	openssh-server  # a real sshd (in an isolated root) for the builder-instance strategy
	openssl
	ovmf            # UEFI firmware for the qemu boot test
	qemu-system-x86 # the boot test of AMI disk images
	python3-venv
	skopeo
	systemd-boot-efi # the UEFI boot loader of AMI disk images
	umoci
	xz-utils        # xz: bake outdated reads Packages.xz indices
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
