#!/bin/sh
# Prepares the api image after app.py is copied in: the service account it runs as, and no
# apt caches or logs left in the layer.
#
# The recipe runs this file as is (`template: false`): it uses no recipe values.
set -eu

# A fixed uid/gid, so the image's numeric `user` (10001:10001) names this account.
if ! getent group api >/dev/null; then
	groupadd --gid 10001 api
fi
if ! getent passwd api >/dev/null; then
	useradd --uid 10001 --gid api --home-dir /opt/api --no-create-home \
		--shell /usr/sbin/nologin api
fi

# The code belongs to root: the service can read it, not change it.
chown -R root:root /opt/api
chmod 0755 /opt/api
chmod 0644 /opt/api/app.py

apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt/* /var/log/dpkg.log
