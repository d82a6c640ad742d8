#!/bin/sh
# Kernel and logging settings for recipes/vendor-hardened.yaml. Runs as root on the builder.
# It only writes configuration: the settings take effect on the AMI's first boot, so the
# builder's own SSH session (bake's connection) is not disturbed.
set -eu

cat >/etc/sysctl.d/90-bake-hardening.conf <<'SYSCTL'
kernel.kptr_restrict = 2
kernel.dmesg_restrict = 1
kernel.yama.ptrace_scope = 1
net.ipv4.conf.all.accept_redirects = 0
net.ipv4.conf.default.accept_redirects = 0
net.ipv4.conf.all.send_redirects = 0
net.ipv4.conf.all.log_martians = 1
net.ipv6.conf.all.accept_redirects = 0
fs.protected_hardlinks = 1
fs.protected_symlinks = 1
fs.suid_dumpable = 0
SYSCTL
chmod 0644 /etc/sysctl.d/90-bake-hardening.conf

# Keep the journal across reboots, bounded.
mkdir -p /etc/systemd/journald.conf.d
cat >/etc/systemd/journald.conf.d/90-bake.conf <<'JOURNAL'
[Journal]
Storage=persistent
SystemMaxUse=200M
JOURNAL

# No core dumps from setuid programs or anyone else.
mkdir -p /etc/security/limits.d
echo '* hard core 0' >/etc/security/limits.d/90-bake-nocore.conf
