#!/usr/bin/env bash
# Cyrus IMAP from Debian's packages, unpacked into a private directory for the test
# fixture (tests/support/cyrus.py). Debian's cyrus-imapd conflicts with dovecot-imapd, so
# the two packages are downloaded and extracted, not installed; the libraries they link
# against conflict with nothing and are installed as usual. Idempotent; run as root
# (.ci/run runs it, and so does the fixture when Cyrus is missing and it is root).
set -euo pipefail
dest=${1:-/var/cache/mailbeat/cyrus}

# The libraries a program the fixture runs cannot find (with the unpacked ones on the
# path), one per line; nothing when the install is complete.
unresolved() {
  local program
  for program in master imapd idled ctl_cyrusdb reconstruct mbpath; do
    LD_LIBRARY_PATH=$dest/usr/lib/x86_64-linux-gnu ldd "$dest/usr/lib/cyrus/bin/$program" ||
      echo "$program not found"
  done | awk '/not found/ {print $1}' | sort -u
}

# Done only if the programs are there and run: an unpacked directory kept (or restored
# from a cache) on a machine without the libraries is not an install.
if [[ -x $dest/usr/lib/cyrus/bin/master && -x /usr/sbin/saslpasswd2 && -z $(unresolved) ]]; then
  exit 0
fi

# What Debian's imapd links against beyond what dovecot-imapd, postgresql and python3
# bring (libjansson4, libpcre3, libxapian30, libical3: .ci/run's other packages may pull
# some in, which is no promise); sasl2-bin: saslpasswd2, which writes the fixture's
# password database; libsasl2-modules: the PLAIN and LOGIN mechanisms.
libraries=(libjansson4 libpcre3 libxapian30 libical3 libsasl2-modules sasl2-bin)
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${libraries[@]}" >/dev/null

if [[ ! -x $dest/usr/lib/cyrus/bin/master ]]; then
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
fi

# A library Debian's packages start to need (a new point release) fails here, by name,
# not as a fixture that does not start.
missing=$(unresolved)
if [[ -n $missing ]]; then
  echo "cyrus: not found: $(echo "$missing" | tr '\n' ' ')" >&2
  echo "cyrus: a library: add its package above; a program: remove $dest and run again" >&2
  exit 1
fi
