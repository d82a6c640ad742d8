#!/bin/sh
# bake hardening profile `baseline`, AMI flavour: a full system with a kernel, systemd and sshd.
# bake runs oci.sh (every rule that also applies in a container, and the `excluded`, `installed`
# and `set_key` helpers) and then this file, in one shell: these are the rules only a machine has.
# Not runnable on its own.
#
# The step has no network: packages the rules configure (openssh-server, sudo, auditd,
# libpam-pwquality, nftables, rsyslog, cron, aide, apparmor, apparmor-utils, systemd-timesyncd)
# come from the base, e.g. `base.bootstrap.packages` (see docs/recipe.md). A rule whose package
# is missing is skipped with a message.

# enable_unit UNIT: enables a systemd unit offline (what `systemctl enable` links).
enable_unit() {
	command -v systemctl >/dev/null 2>&1 || return 0
	systemctl --root=/ enable "$1" >/dev/null 2>&1 || echo "baseline: could not enable $1"
}

if ! excluded sysctl; then
	# In the main file (scanners read it first) and nowhere else, so no later drop-in of bake's
	# contradicts it.
	rm -f /etc/sysctl.d/60-bake-baseline.conf
	touch /etc/sysctl.conf
	while read -r key value; do
		set_key /etc/sysctl.conf "$key" "$value" ' = '
	done <<'SYSCTL'
net.ipv4.ip_forward 0
net.ipv4.conf.all.send_redirects 0
net.ipv4.conf.default.send_redirects 0
net.ipv4.conf.all.accept_redirects 0
net.ipv4.conf.default.accept_redirects 0
net.ipv4.conf.all.secure_redirects 0
net.ipv4.conf.default.secure_redirects 0
net.ipv4.conf.all.accept_source_route 0
net.ipv4.conf.default.accept_source_route 0
net.ipv4.conf.all.log_martians 1
net.ipv4.conf.default.log_martians 1
net.ipv4.conf.all.rp_filter 1
net.ipv4.conf.default.rp_filter 1
net.ipv4.conf.all.accept_local 0
net.ipv4.conf.all.arp_filter 1
net.ipv4.conf.all.arp_ignore 2
net.ipv4.conf.all.drop_gratuitous_arp 1
net.ipv4.conf.all.route_localnet 0
net.ipv4.conf.all.shared_media 0
net.ipv4.conf.default.shared_media 0
net.ipv4.icmp_echo_ignore_broadcasts 1
net.ipv4.icmp_ignore_bogus_error_responses 1
net.ipv4.tcp_syncookies 1
net.ipv4.tcp_rfc1337 1
net.ipv4.ip_local_port_range 32768 65535
net.ipv6.conf.all.forwarding 0
net.ipv6.conf.all.accept_ra 0
net.ipv6.conf.default.accept_ra 0
net.ipv6.conf.all.accept_ra_defrtr 0
net.ipv6.conf.default.accept_ra_defrtr 0
net.ipv6.conf.all.accept_ra_pinfo 0
net.ipv6.conf.default.accept_ra_pinfo 0
net.ipv6.conf.all.accept_ra_rtr_pref 0
net.ipv6.conf.default.accept_ra_rtr_pref 0
net.ipv6.conf.all.accept_redirects 0
net.ipv6.conf.default.accept_redirects 0
net.ipv6.conf.all.accept_source_route 0
net.ipv6.conf.default.accept_source_route 0
net.ipv6.conf.all.autoconf 0
net.ipv6.conf.default.autoconf 0
net.ipv6.conf.all.max_addresses 1
net.ipv6.conf.default.max_addresses 1
net.ipv6.conf.all.router_solicitations 0
net.ipv6.conf.default.router_solicitations 0
net.core.bpf_jit_harden 2
kernel.randomize_va_space 2
kernel.kptr_restrict 2
kernel.dmesg_restrict 1
kernel.yama.ptrace_scope 1
kernel.sysrq 0
kernel.unprivileged_bpf_disabled 1
kernel.perf_event_paranoid 2
kernel.perf_cpu_time_max_percent 1
kernel.perf_event_max_sample_rate 1
kernel.panic_on_oops 1
kernel.pid_max 65536
vm.mmap_min_addr 65536
fs.suid_dumpable 0
fs.protected_hardlinks 1
fs.protected_symlinks 1
fs.protected_fifos 2
fs.protected_regular 2
SYSCTL
	chmod 0644 /etc/sysctl.conf
fi

if ! excluded sshd && [ -f /etc/ssh/sshd_config ]; then
	# sshd uses the first value it reads for a keyword, and Debian's sshd_config includes
	# sshd_config.d/*.conf at its top: bake's settings go in one block above that Include, and
	# active lines elsewhere setting the same keywords (outside Match blocks) are removed, so the
	# main file says exactly what sshd does.
	begin='# BEGIN bake baseline'
	end='# END bake baseline'
	block=$(mktemp)
	cat >"$block" <<'SSHD'
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
HostbasedAuthentication no
IgnoreRhosts yes
PermitUserEnvironment no
UsePAM yes
X11Forwarding no
AllowTcpForwarding no
DenyUsers root
MaxAuthTries 4
MaxSessions 10
MaxStartups 10:30:60
LoginGraceTime 60
ClientAliveInterval 300
ClientAliveCountMax 3
LogLevel INFO
Banner /etc/issue.net
Ciphers aes256-gcm@openssh.com,aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr
MACs hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512,hmac-sha2-256
KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org,diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,diffie-hellman-group-exchange-sha256
SSHD
	rest=$(mktemp)
	# Drop bake's previous block, then every active line for a keyword of the block (up to the
	# first Match).
	awk -v begin="$begin" -v end="$end" -v block="$block" '
		BEGIN { while ((getline line < block) > 0) { split(line, f, " "); keys[tolower(f[1])] = 1 } }
		$0 == begin { skip = 1; next }
		$0 == end { skip = 0; next }
		skip { next }
		tolower($1) == "match" { inmatch = 1 }
		!inmatch && ($1 !~ /^#/) && (tolower($1) in keys) { next }
		{ print }
	' /etc/ssh/sshd_config >"$rest"
	{
		echo "$begin"
		cat "$block"
		echo "$end"
		cat "$rest"
	} >/etc/ssh/sshd_config
	rm -f "$block" "$rest"
	chown root:root /etc/ssh/sshd_config
	chmod 0600 /etc/ssh/sshd_config
	for key in /etc/ssh/ssh_host_*_key; do
		[ -f "$key" ] && chown root:root "$key" && chmod 0600 "$key"
	done
	for key in /etc/ssh/ssh_host_*_key.pub; do
		[ -f "$key" ] && chown root:root "$key" && chmod 0644 "$key"
	done
	true
fi

if ! excluded banner; then
	# Banners say who may log in, never which system or version runs.
	for file in /etc/issue /etc/issue.net /etc/motd; do
		printf 'Authorized use only. Activity is monitored and logged.\n' >"$file"
		chown root:root "$file"
		chmod 0644 "$file"
	done
fi

if ! excluded sudo && [ -f /etc/sudoers ]; then
	# In /etc/sudoers itself: commands run on their own pseudo-terminal, are logged to a file,
	# and a password is asked again after 15 minutes.
	ensure_line /etc/sudoers 'Defaults	use_pty'
	ensure_line /etc/sudoers 'Defaults	logfile="/var/log/sudo.log"'
	ensure_line /etc/sudoers 'Defaults	timestamp_timeout=15'
	ensure_line /etc/sudoers 'Defaults	env_reset'
	ensure_line /etc/sudoers 'Defaults	ignore_dot'
	ensure_line /etc/sudoers 'Defaults	umask=0027'
	sed -i -E '/^[^#].*NOPASSWD/s/^/# bake baseline: no NOPASSWD: /' /etc/sudoers
	chown root:root /etc/sudoers
	chmod 0440 /etc/sudoers
	if [ -d /etc/sudoers.d ]; then
		chown root:root /etc/sudoers.d
		chmod 0750 /etc/sudoers.d
	fi
	if command -v visudo >/dev/null 2>&1; then
		visudo -c -q -f /etc/sudoers
	fi
fi

if ! excluded kernel-modules; then
	# Filesystems and protocols a server does not need cannot be loaded.
	mkdir -p /etc/modprobe.d
	for module in cramfs freevxfs hfs hfsplus jffs2 udf usb-storage dccp sctp rds tipc; do
		printf 'install %s /bin/false\nblacklist %s\n' "$module" "$module" >"/etc/modprobe.d/$module.conf"
		chmod 0644 "/etc/modprobe.d/$module.conf"
	done
	rm -f /etc/modprobe.d/bake-baseline.conf
fi

if ! excluded tmp-mounts; then
	# /tmp and /dev/shm are tmpfs without devices, setuid or executables.
	touch /etc/fstab
	grep -q '^tmpfs[[:space:]]\+/tmp[[:space:]]' /etc/fstab ||
		printf 'tmpfs /tmp tmpfs defaults,rw,nosuid,nodev,noexec,relatime,size=512M 0 0\n' >>/etc/fstab
	grep -q '^tmpfs[[:space:]]\+/dev/shm[[:space:]]' /etc/fstab ||
		printf 'tmpfs /dev/shm tmpfs defaults,rw,nosuid,nodev,noexec,relatime 0 0\n' >>/etc/fstab
	if [ -f /usr/share/systemd/tmp.mount ] && [ ! -e /etc/systemd/system/tmp.mount ]; then
		cp /usr/share/systemd/tmp.mount /etc/systemd/system/tmp.mount
		sed -i -E 's/^Options=.*/Options=mode=1777,strictatime,nosuid,nodev,noexec,size=50%%,nr_inodes=1m/' /etc/systemd/system/tmp.mount
		enable_unit tmp.mount
	fi
fi

if ! excluded journald && [ -f /etc/systemd/journald.conf ]; then
	# In journald.conf itself: scanners do not read journald.conf.d.
	set_key /etc/systemd/journald.conf Storage persistent =
	set_key /etc/systemd/journald.conf Compress yes =
	if installed rsyslog; then
		set_key /etc/systemd/journald.conf ForwardToSyslog yes =
	else
		set_key /etc/systemd/journald.conf ForwardToSyslog no =
	fi
	rm -f /etc/systemd/journald.conf.d/60-bake-baseline.conf
fi

if ! excluded rsyslog && installed rsyslog && [ -f /etc/rsyslog.conf ]; then
	# Log files rsyslog creates are not world-readable; it receives nothing from the network.
	if grep -q '^\$FileCreateMode' /etc/rsyslog.conf; then
		sed -i -E 's/^\$FileCreateMode.*/$FileCreateMode 0640/' /etc/rsyslog.conf
	else
		printf '$FileCreateMode 0640\n' >>/etc/rsyslog.conf
	fi
	enable_unit rsyslog.service
fi

if ! excluded journal-remote && installed systemd-journal-remote; then
	# Nothing listens for other hosts' journals; uploading is configured per site.
	if command -v systemctl >/dev/null 2>&1; then
		systemctl --root=/ disable systemd-journal-remote.socket >/dev/null 2>&1 || true
		systemctl --root=/ mask systemd-journal-remote.socket >/dev/null 2>&1 || true
	fi
fi

if ! excluded time-sync && installed systemd-timesyncd && [ -f /etc/systemd/timesyncd.conf ]; then
	# The Amazon Time Sync Service first, Debian's pool as the fallback.
	set_key /etc/systemd/timesyncd.conf NTP '169.254.169.123' =
	set_key /etc/systemd/timesyncd.conf FallbackNTP '0.debian.pool.ntp.org 1.debian.pool.ntp.org 2.debian.pool.ntp.org 3.debian.pool.ntp.org' =
	enable_unit systemd-timesyncd.service
fi

if ! excluded firewall && installed nftables; then
	# Default deny inbound and forwarded traffic; loopback, established flows and SSH are let in.
	# A recipe opens its service's ports with rules in /etc/nftables.d/input/*.nft (for example
	# `tcp dport 443 accept`), read inside the input chain.
	mkdir -p /etc/nftables.d/input
	cat >/etc/nftables.conf <<'NFT'
#!/usr/sbin/nft -f
# bake baseline: default-deny firewall.
flush ruleset

table inet filter {
	chain input {
		type filter hook input priority 0; policy drop;
		iif "lo" accept
		iif != "lo" ip saddr 127.0.0.0/8 drop
		iif != "lo" ip6 saddr ::1 drop
		ct state established,related accept
		ct state invalid drop
		ip protocol icmp icmp type { echo-request, destination-unreachable, time-exceeded, parameter-problem } accept
		ip6 nexthdr ipv6-icmp accept
		tcp dport 22 accept
		include "/etc/nftables.d/input/*.nft"
	}
	chain forward {
		type filter hook forward priority 0; policy drop;
	}
	chain output {
		type filter hook output priority 0; policy accept;
	}
}
NFT
	chmod 0700 /etc/nftables.conf
	chown root:root /etc/nftables.conf /etc/nftables.d
	chmod 0750 /etc/nftables.d
	enable_unit nftables.service
fi

if ! excluded cron && [ -f /etc/crontab ]; then
	# Only root reads the cron tables; only allowed users (none but root) use cron and at.
	chown root:root /etc/crontab
	chmod 0600 /etc/crontab
	for dir in /etc/cron.d /etc/cron.hourly /etc/cron.daily /etc/cron.weekly /etc/cron.monthly /etc/cron.yearly; do
		[ -d "$dir" ] && chown root:root "$dir" && chmod 0700 "$dir"
	done
	rm -f /etc/cron.deny /etc/at.deny
	for file in /etc/cron.allow /etc/at.allow; do
		[ -f "$file" ] || printf 'root\n' >"$file"
		chown root:root "$file"
		chmod 0640 "$file"
	done
	enable_unit cron.service
fi

if ! excluded apparmor && installed apparmor; then
	# The kernel starts AppArmor; every profile shipped is at least in complain mode.
	mkdir -p /etc/default/grub.d /etc/kernel
	printf 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX apparmor=1 security=apparmor"\n' >/etc/default/grub.d/60-bake-apparmor.cfg
	if [ -f /etc/default/grub ]; then
		grep -q 'apparmor=1' /etc/default/grub ||
			sed -i -E 's/^GRUB_CMDLINE_LINUX="([^"]*)"/GRUB_CMDLINE_LINUX="\1 apparmor=1 security=apparmor"/' /etc/default/grub
	fi
	enable_unit apparmor.service
fi

if ! excluded audit && installed auditd && [ -d /etc/audit ]; then
	# Privileged commands, identity files, sudo and logins are audited; the rules are immutable
	# until the next boot.
	mkdir -p /etc/audit/rules.d
	cat >/etc/audit/rules.d/60-bake-baseline.rules <<'AUDIT'
-w /etc/passwd -p wa -k identity
-w /etc/group -p wa -k identity
-w /etc/shadow -p wa -k identity
-w /etc/gshadow -p wa -k identity
-w /etc/security/opasswd -p wa -k identity
-w /etc/sudoers -p wa -k scope
-w /etc/sudoers.d -p wa -k scope
-w /var/log/sudo.log -p wa -k actions
-w /var/log/lastlog -p wa -k logins
-w /var/run/faillock -p wa -k logins
-w /etc/ssh/sshd_config -p wa -k sshd
-a always,exit -F path=/usr/bin/sudo -F perm=x -F auid>=1000 -F auid!=unset -k privileged
-a always,exit -F path=/usr/bin/su -F perm=x -F auid>=1000 -F auid!=unset -k privileged
-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k modules
-a always,exit -F arch=b64 -S sethostname,setdomainname -k system-locale
-e 2
AUDIT
	chmod 0640 /etc/audit/rules.d/60-bake-baseline.rules
	if [ -f /etc/audit/auditd.conf ]; then
		set_key /etc/audit/auditd.conf max_log_file_action keep_logs ' = '
	fi
	enable_unit auditd.service
fi

if ! excluded log-permissions && [ -d /var/log ]; then
	: >>/var/log/sudo.log
	chmod 0640 /var/log/sudo.log
fi

if ! excluded aide && installed aide && [ -f /etc/aide/aide.conf ]; then
	# A database of the image as built, checked daily. Built last, after every other rule.
	# aide 0.18 still reads the operational database from `database=` (deprecated for
	# `database_in=`), which is the key CIS content looks for.
	sed -i -E 's|^database_in=(file:.*)$|database=\1|' /etc/aide/aide.conf
	if [ ! -f /var/lib/aide/aide.db ]; then
		aide --config /etc/aide/aide.conf --init >/dev/null 2>&1 || true
	fi
	if [ -f /var/lib/aide/aide.db.new ]; then
		mv -f /var/lib/aide/aide.db.new /var/lib/aide/aide.db
		chmod 0600 /var/lib/aide/aide.db
	fi
	enable_unit dailyaidecheck.timer
fi

echo "baseline (ami): done"
