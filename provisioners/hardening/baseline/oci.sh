#!/bin/sh
# bake hardening profile `baseline`, OCI flavour: what applies inside a container image
# (no kernel, no services, no boot). Each rule has an id; BAKE_HARDENING_EXCLUDE lists the ids a
# recipe opted out of (with a reason, recorded in the recipe). Idempotent: running it twice
# changes nothing the second time.
#
# Values are set in the main configuration files (login.defs, bash.bashrc, profile, pam.d),
# where CIS auditors and the SCAP Security Guide look, not only in drop-ins.
set -eu

excluded() {
	case " ${BAKE_HARDENING_EXCLUDE:-} " in
	*" $1 "*) echo "baseline: skipping $1 (excluded by the recipe)"; return 0 ;;
	esac
	return 1
}

installed() {
	dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed
}

# set_key FILE KEY VALUE [SEPARATOR]: sets `KEY<SEPARATOR>VALUE` (a space by default) in a
# login.defs-style file. Every active line setting KEY (followed by blanks or `=`) is rewritten;
# commented example lines are left alone; a KEY with no active line is appended once.
set_key() {
	file=$1 key=$2 value=$3 sep=${4- }
	[ -f "$file" ] || return 0
	if grep -Eq "^[[:space:]]*${key}([[:space:]=]|\$)" "$file"; then
		sed -i -E "s|^[[:space:]]*${key}([[:space:]=].*)?\$|${key}${sep}${value}|" "$file"
	else
		printf '%s%s%s\n' "$key" "$sep" "$value" >>"$file"
	fi
}

# has_pam_module NAME: whether the PAM module NAME.so is installed.
has_pam_module() {
	[ -n "$(find /lib /usr/lib -name "$1.so" -path '*security*' 2>/dev/null | head -n 1)" ]
}

# ensure_line FILE LINE: appends LINE to FILE unless it is already there.
ensure_line() {
	[ -f "$1" ] || return 0
	grep -qxF "$2" "$1" || printf '%s\n' "$2" >>"$1"
}

if ! excluded login-defs && [ -f /etc/login.defs ]; then
	set_key /etc/login.defs UMASK 027
	set_key /etc/login.defs PASS_MAX_DAYS 365
	set_key /etc/login.defs PASS_MIN_DAYS 1
	set_key /etc/login.defs PASS_WARN_AGE 7
	set_key /etc/login.defs ENCRYPT_METHOD YESCRYPT
	set_key /etc/login.defs HOME_MODE 0750
	# Accounts created later are disabled 45 days after their password expires.
	set_key /etc/default/useradd INACTIVE 45 =
fi

if ! excluded shell-umask; then
	# The main files, read by every login and interactive shell.
	for file in /etc/profile /etc/bash.bashrc; do
		if [ -f "$file" ]; then
			sed -i -E 's/^([[:space:]]*)umask[[:space:]]+[0-7]+/\1umask 027/' "$file"
			ensure_line "$file" 'umask 027'
		fi
	done
	if [ -f /root/.bashrc ]; then
		sed -i -E 's/^([[:space:]]*)umask[[:space:]]+[0-7]+/\1umask 027/' /root/.bashrc
	fi
fi

if ! excluded shell-timeout && [ -f /etc/profile ]; then
	# Idle interactive shells end after 15 minutes.
	# `declare -xr` is bash's (and what auditors look for); dash reads /etc/profile too.
	if ! grep -q 'declare -xr TMOUT=' /etc/profile; then
		printf 'if [ -n "${BASH_VERSION:-}" ] && [ -z "${TMOUT:-}" ]; then\n\tdeclare -xr TMOUT=900\nfi\n' >>/etc/profile
	fi
fi

if ! excluded root-login-locked && [ -f /etc/shadow ]; then
	# Nobody logs in as root with a password: root is reached with sudo (or, in a container,
	# with `exec`).
	sed -i -E 's/^root:[^:]*:/root:*:/' /etc/shadow
fi

if ! excluded su-restricted && [ -f /etc/pam.d/su ]; then
	# `su` is limited to the members of an empty group: nobody, unless an operator adds them.
	grep -q '^sugroup:' /etc/group || groupadd -r sugroup
	if ! grep -Eq '^auth[[:space:]]+required[[:space:]]+pam_wheel\.so.*group=sugroup' /etc/pam.d/su; then
		sed -i -E '/^#?[[:space:]]*auth[[:space:]]+required[[:space:]]+pam_wheel\.so[[:space:]]*$/d' /etc/pam.d/su
		sed -i '0,/^@include common-auth/s//auth       required   pam_wheel.so use_uid group=sugroup\n@include common-auth/' /etc/pam.d/su
	fi
fi

if ! excluded pam-passwords && [ -d /etc/pam.d ]; then
	# No empty passwords anywhere in the PAM stack.
	for file in /etc/pam.d/common-auth /etc/pam.d/common-password /etc/pam.d/common-account \
		/etc/pam.d/common-session /etc/pam.d/common-session-noninteractive; do
		[ -f "$file" ] && sed -i -E 's/[[:space:]]+nullok(_secure)?\b//g' "$file"
	done
	if [ -f /etc/pam.d/common-password ]; then
		# Strong hashes, and the last 24 passwords remembered.
		sed -i -E '/pam_unix\.so/{s/[[:space:]](md5|sha256|sha512|bigcrypt|blowfish|gost_yescrypt)\b/ yescrypt/; s/[[:space:]]remember=[0-9]+//}' /etc/pam.d/common-password
		grep -Eq 'pam_unix\.so.*\byescrypt\b' /etc/pam.d/common-password ||
			sed -i -E '/^password.*pam_unix\.so/s/$/ yescrypt/' /etc/pam.d/common-password
		grep -Eq 'pam_unix\.so.*\buse_authtok\b' /etc/pam.d/common-password ||
			sed -i -E '/^password.*pam_unix\.so/s/$/ use_authtok/' /etc/pam.d/common-password
		if ! grep -q 'pam_pwhistory\.so' /etc/pam.d/common-password; then
			sed -i -E '0,/^password.*pam_unix\.so/s//password\trequisite\t\t\tpam_pwhistory.so remember=24 enforce_for_root try_first_pass use_authtok\n&/' /etc/pam.d/common-password
		fi
	fi
	if [ -f /etc/security/pwquality.conf ]; then
		set_key /etc/security/pwquality.conf minlen 14 ' = '
		set_key /etc/security/pwquality.conf minclass 4 ' = '
		set_key /etc/security/pwquality.conf dcredit -1 ' = '
		set_key /etc/security/pwquality.conf ucredit -1 ' = '
		set_key /etc/security/pwquality.conf lcredit -1 ' = '
		set_key /etc/security/pwquality.conf ocredit -1 ' = '
		set_key /etc/security/pwquality.conf difok 2 ' = '
		set_key /etc/security/pwquality.conf maxrepeat 3 ' = '
		set_key /etc/security/pwquality.conf maxsequence 3 ' = '
		set_key /etc/security/pwquality.conf dictcheck 1 ' = '
		set_key /etc/security/pwquality.conf enforcing 1 ' = '
		set_key /etc/security/pwquality.conf enforce_for_root '' ''
		set_key /etc/security/pwquality.conf retry 3 ' = '
	fi
fi

if ! excluded faillock && [ -f /etc/pam.d/common-auth ] && has_pam_module pam_faillock; then
	# Four failed logins lock an account for 15 minutes (root too).
	if [ -f /etc/security/faillock.conf ]; then
		set_key /etc/security/faillock.conf deny 4 ' = '
		set_key /etc/security/faillock.conf unlock_time 900 ' = '
		set_key /etc/security/faillock.conf fail_interval 900 ' = '
		set_key /etc/security/faillock.conf even_deny_root '' ''
		set_key /etc/security/faillock.conf root_unlock_time 900 ' = '
	fi
	if ! grep -q 'pam_faillock\.so' /etc/pam.d/common-auth; then
		# Debian's stack: preauth before pam_unix, authfail (skipped on success) and authsucc
		# after it, before pam_deny.
		awk '
			/^auth.*pam_unix\.so/ && !done {
				print "auth\trequired\t\t\tpam_faillock.so preauth"
				print
				print "auth\t[default=die]\t\t\tpam_faillock.so authfail"
				print "auth\tsufficient\t\t\tpam_faillock.so authsucc"
				done = 1
				next
			}
			{ print }
		' /etc/pam.d/common-auth >/etc/pam.d/common-auth.bake
		cat /etc/pam.d/common-auth.bake >/etc/pam.d/common-auth
		rm -f /etc/pam.d/common-auth.bake
	fi
	if [ -f /etc/pam.d/common-account ] && ! grep -q 'pam_faillock\.so' /etc/pam.d/common-account; then
		printf 'account\trequired\t\t\tpam_faillock.so\n' >>/etc/pam.d/common-account
	fi
fi

if ! excluded shadow-files; then
	# Account databases and their backups: owned by root, readable only where they must be.
	for file in /etc/passwd /etc/passwd- /etc/group /etc/group-; do
		[ -f "$file" ] && chown root:root "$file" && chmod 0644 "$file"
	done
	for file in /etc/shadow /etc/shadow- /etc/gshadow /etc/gshadow-; do
		[ -f "$file" ] && chown root:shadow "$file" && chmod 0640 "$file"
	done
	[ -f /etc/shells ] && chown root:root /etc/shells && chmod 0644 /etc/shells
	[ -f /etc/security/opasswd ] && chown root:root /etc/security/opasswd && chmod 0600 /etc/security/opasswd
	true
fi

if ! excluded setuid-binaries; then
	# Tools that only matter on interactive multi-user systems lose their setuid/setgid bit.
	for tool in chfn chsh gpasswd newgrp chage expiry wall write mount umount; do
		for dir in /usr/bin /bin /usr/sbin /sbin; do
			if [ -f "$dir/$tool" ] && [ ! -L "$dir/$tool" ]; then
				chmod u-s,g-s "$dir/$tool"
			fi
		done
	done
fi

if ! excluded world-writable-files; then
	find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune \
		-o -type f -perm -0002 -exec chmod o-w {} +
	# World-writable directories keep the sticky bit, so nobody removes another user's files.
	find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune \
		-o -type d -perm -0002 ! -perm -1000 -exec chmod +t {} +
fi

if ! excluded unowned-files; then
	# Files left with ids no user or group has (from package builds) go to root.
	find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune -o -nouser -exec chown root {} +
	find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune -o -nogroup -exec chgrp root {} +
fi

if ! excluded log-permissions && [ -d /var/log ]; then
	# Logs are written by root and read by adm: nothing under /var/log is world-readable.
	find /var/log -type f -perm /0137 -exec chmod u-x,g-wx,o-rwx {} +
	find /var/log -type d -perm /0027 -exec chmod g-w,o-rwx {} +
fi

if ! excluded core-dumps; then
	if [ -f /etc/security/limits.conf ]; then
		ensure_line /etc/security/limits.conf '*               hard    core            0'
	fi
	if [ -d /etc/systemd ]; then
		mkdir -p /etc/systemd/coredump.conf.d
		printf '[Coredump]\nStorage=none\nProcessSizeMax=0\n' >/etc/systemd/coredump.conf.d/60-bake-baseline.conf
		chmod 0644 /etc/systemd/coredump.conf.d/60-bake-baseline.conf
	fi
fi

if ! excluded unneeded-packages; then
	# Clients and servers of clear-text or legacy protocols never belong in a baseline image.
	for package in telnet inetutils-telnet rsh-client rsh-redone-client talk ntalk nis ypserv \
		ftp tnftp tftp-hpa tftpd-hpa xinetd openbsd-inetd avahi-daemon cups slapd ldap-utils \
		rpcbind nfs-kernel-server snmpd squid samba vsftpd dovecot-core bind9 dnsmasq isc-dhcp-server autofs; do
		if installed "$package"; then
			DEBIAN_FRONTEND=noninteractive dpkg --purge "$package"
		fi
	done
fi

if ! excluded apt-caches; then
	rm -rf /var/cache/apt/archives/*.deb /var/cache/apt/*.bin
fi

echo "baseline: container rules done"
