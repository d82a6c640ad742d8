#!/bin/sh
# bake hardening profile `baseline`, AMI flavour: a full system with a kernel, systemd and sshd.
# bake runs oci.sh (every rule that also applies in a container, and the `excluded` and
# `set_key` helpers) and then this file, in one shell: these are the rules only a machine has.
# Not runnable on its own.
if ! excluded sysctl; then
	mkdir -p /etc/sysctl.d
	cat >/etc/sysctl.d/60-bake-baseline.conf <<'SYSCTL'
net.ipv4.ip_forward = 0
net.ipv4.conf.all.send_redirects = 0
net.ipv4.conf.default.send_redirects = 0
net.ipv4.conf.all.accept_redirects = 0
net.ipv4.conf.default.accept_redirects = 0
net.ipv4.conf.all.secure_redirects = 0
net.ipv4.conf.default.secure_redirects = 0
net.ipv4.conf.all.accept_source_route = 0
net.ipv4.conf.default.accept_source_route = 0
net.ipv4.conf.all.log_martians = 1
net.ipv4.conf.default.log_martians = 1
net.ipv4.conf.all.rp_filter = 1
net.ipv4.conf.default.rp_filter = 1
net.ipv4.icmp_echo_ignore_broadcasts = 1
net.ipv4.icmp_ignore_bogus_error_responses = 1
net.ipv4.tcp_syncookies = 1
net.ipv6.conf.all.accept_ra = 0
net.ipv6.conf.default.accept_ra = 0
net.ipv6.conf.all.accept_redirects = 0
net.ipv6.conf.default.accept_redirects = 0
kernel.randomize_va_space = 2
kernel.kptr_restrict = 2
kernel.dmesg_restrict = 1
kernel.yama.ptrace_scope = 1
fs.suid_dumpable = 0
fs.protected_hardlinks = 1
fs.protected_symlinks = 1
SYSCTL
	chmod 0644 /etc/sysctl.d/60-bake-baseline.conf
fi

if ! excluded sshd && [ -f /etc/ssh/sshd_config ]; then
	set_sshd() {
		if grep -Eq "^[#[:space:]]*${1}[[:space:]]" /etc/ssh/sshd_config; then
			sed -i -E "s|^[#[:space:]]*${1}[[:space:]].*|$1 $2|" /etc/ssh/sshd_config
		else
			printf '%s %s\n' "$1" "$2" >>/etc/ssh/sshd_config
		fi
	}
	set_sshd PermitRootLogin no
	set_sshd PasswordAuthentication no
	set_sshd KbdInteractiveAuthentication no
	set_sshd PermitEmptyPasswords no
	set_sshd HostbasedAuthentication no
	set_sshd IgnoreRhosts yes
	set_sshd X11Forwarding no
	set_sshd MaxAuthTries 4
	set_sshd LoginGraceTime 60
	set_sshd ClientAliveInterval 300
	set_sshd ClientAliveCountMax 3
	set_sshd LogLevel VERBOSE
	set_sshd Banner /etc/issue.net
	set_sshd Ciphers aes256-gcm@openssh.com,aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr
	set_sshd MACs hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512,hmac-sha2-256
	set_sshd KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org,diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,diffie-hellman-group-exchange-sha256
	chmod 0600 /etc/ssh/sshd_config
	printf 'Authorized use only. Activity is monitored and logged.\n' >/etc/issue.net
	cp /etc/issue.net /etc/issue
fi

if ! excluded kernel-modules; then
	mkdir -p /etc/modprobe.d
	: >/etc/modprobe.d/bake-baseline.conf
	for module in cramfs freevxfs hfs hfsplus jffs2 udf usb-storage dccp sctp rds tipc; do
		printf 'install %s /bin/false\nblacklist %s\n' "$module" "$module" >>/etc/modprobe.d/bake-baseline.conf
	done
fi

if ! excluded tmp-mounts && [ -f /etc/fstab ]; then
	grep -q '^tmpfs[[:space:]]\+/tmp[[:space:]]' /etc/fstab ||
		printf 'tmpfs /tmp tmpfs defaults,rw,nosuid,nodev,noexec,relatime,size=512M 0 0\n' >>/etc/fstab
	grep -q '^tmpfs[[:space:]]\+/dev/shm[[:space:]]' /etc/fstab ||
		printf 'tmpfs /dev/shm tmpfs defaults,rw,nosuid,nodev,noexec,relatime 0 0\n' >>/etc/fstab
fi

if ! excluded journald && [ -d /etc/systemd ]; then
	mkdir -p /etc/systemd/journald.conf.d
	printf '[Journal]\nStorage=persistent\nCompress=yes\n' >/etc/systemd/journald.conf.d/60-bake-baseline.conf
fi

echo "baseline (ami): done"
