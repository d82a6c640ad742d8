#!/bin/sh
# Installs the checkout service into the image: a system user, its configuration and its
# systemd units, enabled so that it starts at boot.
#
# bake renders this file as a template before running it as root inside the image: the
# \{{…}} below are recipe values (recipes/checkout-ami.yaml). It needs no network.
#
# The service itself is a stand-in that keeps the example self-contained: a socket-activated
# HTTP responder (systemd accepts each connection and runs checkout-handler on it) answering
# /healthz and /version. A real pipeline ships its release the same way, with a `file` step
# copying the build output and this script installing the units around it.
set -eu

PORT='{{var.checkout_port}}'
ENVIRONMENT='{{var.env}}'
BUILD='{{version_short}}'

# The service account: no login, no home directory of its own.
if ! getent passwd checkout >/dev/null; then
	useradd --system --user-group --home-dir /var/lib/checkout --no-create-home \
		--shell /usr/sbin/nologin checkout
fi
install -d -m 0755 -o root -g root /opt/checkout /opt/checkout/bin /etc/checkout
install -d -m 0750 -o checkout -g checkout /var/lib/checkout

cat >/etc/checkout/checkout.env <<CONF
CHECKOUT_ENVIRONMENT=$ENVIRONMENT
CHECKOUT_BUILD=$BUILD
CONF
chmod 0644 /etc/checkout/checkout.env

cat >/opt/checkout/bin/checkout-handler <<'HANDLER'
#!/bin/sh
# One HTTP exchange on stdin/stdout: systemd hands over the accepted connection.
set -eu
set -f
cr=$(printf '\r')
IFS= read -r request || exit 0
request=${request%"$cr"}
# Drain the request headers up to the empty line.
while IFS= read -r header; do
	header=${header%"$cr"}
	[ -n "$header" ] || break
done
set -- $request
case "${1:-} ${2:-}" in
"GET /healthz")
	status="200 OK"
	body='{"status":"ok"}'
	;;
"GET /version")
	status="200 OK"
	body="{\"service\":\"checkout\",\"environment\":\"$CHECKOUT_ENVIRONMENT\",\"build\":\"$CHECKOUT_BUILD\"}"
	;;
*)
	status="404 Not Found"
	body='{"error":"not found"}'
	;;
esac
printf 'HTTP/1.0 %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
	"$status" "${#body}" "$body"
HANDLER
chmod 0755 /opt/checkout/bin/checkout-handler

cat >/etc/systemd/system/checkout.socket <<UNIT
[Unit]
Description=checkout service (listening socket)

[Socket]
ListenStream=$PORT
Accept=yes
MaxConnections=256

[Install]
WantedBy=sockets.target
UNIT

cat >/etc/systemd/system/checkout@.service <<'UNIT'
[Unit]
Description=checkout service (one connection)

[Service]
ExecStart=/opt/checkout/bin/checkout-handler
StandardInput=socket
StandardOutput=socket
StandardError=journal
EnvironmentFile=/etc/checkout/checkout.env
User=checkout
Group=checkout
RuntimeMaxSec=30
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
UNIT
chmod 0644 /etc/systemd/system/checkout.socket /etc/systemd/system/checkout@.service

# Offline (in the image, without a running systemd), `enable` only creates the symlinks.
systemctl enable checkout.socket
