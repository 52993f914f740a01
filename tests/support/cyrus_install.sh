#!/usr/bin/env bash
# Cyrus IMAP from Debian's packages, unpacked into a private directory for the test
# fixture (tests/support/cyrus.py). Debian's cyrus-imapd conflicts with dovecot-imapd, so
# the two packages are downloaded and extracted, not installed; the libraries they link
# against conflict with nothing and are installed as usual. Idempotent; run as root
# (.ci/run runs it, and so does the fixture when Cyrus is missing and it is root).
set -euo pipefail
dest=${1:-/var/cache/mailbeat/cyrus}
[[ -x $dest/usr/lib/cyrus/bin/master ]] && exit 0

# libpcre3, libxapian30, libical3: what Debian's imapd links against beyond what the
# machine has; sasl2-bin: saslpasswd2, which writes the fixture's password database;
# libsasl2-modules: the PLAIN and LOGIN mechanisms.
libraries=(libpcre3 libxapian30 libical3 libsasl2-modules sasl2-bin)
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${libraries[@]}" >/dev/null

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# As root into a root-owned directory: apt's download sandbox user could not write there.
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root cyrus-imapd cyrus-common)
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$work/root" "$dest"
chmod 755 "$dest"
echo "cyrus: $(cd "$work" && ls ./*.deb | xargs -n1 basename | tr '\n' ' ')-> $dest"
