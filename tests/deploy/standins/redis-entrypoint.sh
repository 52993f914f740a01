#!/bin/sh
set -e
# Like the official image: other containers reach it, and it runs as the redis user.
if [ "$1" = "redis-server" ]; then
  shift
  chown -R redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups redis-server --protected-mode no "$@"
fi
exec "$@"
