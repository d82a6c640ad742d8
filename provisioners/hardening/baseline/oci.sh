#!/bin/sh
# bake hardening profile `baseline`, OCI flavour: what applies inside a container image
# (no kernel, no services, no boot). Each rule has an id; BAKE_HARDENING_EXCLUDE lists the ids a
# recipe opted out of (with a reason, recorded in the recipe). Idempotent: running it twice
# changes nothing the second time.
set -eu

excluded() {
	case " ${BAKE_HARDENING_EXCLUDE:-} " in
	*" $1 "*) echo "baseline: skipping $1 (excluded by the recipe)"; return 0 ;;
	esac
	return 1
}

# set_key FILE KEY VALUE: sets `KEY VALUE` in a login.defs-style file, replacing any line that
# sets KEY (commented or not), so scanners reading the main file see the value.
set_key() {
	file=$1 key=$2 value=$3
	[ -f "$file" ] || return 0
	if grep -Eq "^[#[:space:]]*${key}[[:space:]]" "$file"; then
		sed -i -E "s|^[#[:space:]]*${key}[[:space:]].*|$key $value|" "$file"
	else
		printf '%s %s\n' "$key" "$value" >>"$file"
	fi
}

if ! excluded login-defs; then
	set_key /etc/login.defs UMASK 027
	set_key /etc/login.defs PASS_MAX_DAYS 365
	set_key /etc/login.defs PASS_MIN_DAYS 1
	set_key /etc/login.defs PASS_WARN_AGE 7
	set_key /etc/login.defs ENCRYPT_METHOD SHA512
fi

if ! excluded shell-umask && [ -d /etc/profile.d ]; then
	printf 'umask 027\n' >/etc/profile.d/bake-umask.sh
	chmod 0644 /etc/profile.d/bake-umask.sh
fi

if ! excluded root-login-locked && [ -f /etc/shadow ]; then
	# A container is entered with `exec`, never by logging in: root needs no password.
	sed -i -E 's/^root:[^:]*:/root:*:/' /etc/shadow
fi

if ! excluded setuid-binaries; then
	# Tools that only matter on interactive multi-user systems lose their setuid/setgid bit.
	for tool in chfn chsh gpasswd newgrp chage expiry wall write mount umount su passwd; do
		for dir in /usr/bin /bin /usr/sbin /sbin; do
			if [ -f "$dir/$tool" ] && [ ! -L "$dir/$tool" ]; then
				chmod u-s,g-s "$dir/$tool"
			fi
		done
	done
fi

if ! excluded world-writable-files; then
	find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /tmp -o -path /var/tmp \) -prune \
		-o -type f -perm -0002 -exec chmod o-w {} +
fi

if ! excluded core-dumps && [ -d /etc/security/limits.d ]; then
	printf '* hard core 0\n' >/etc/security/limits.d/bake-no-core.conf
	chmod 0644 /etc/security/limits.d/bake-no-core.conf
fi

if ! excluded apt-caches; then
	rm -rf /var/cache/apt/archives/*.deb /var/cache/apt/*.bin
fi

echo "baseline: container rules done"
