#!/bin/sh
# Every container command runs through this: Numba's on-disk cache for the user the container
# runs as (docker-compose.yml picks the uid), private to it. Numba loads its cache with pickle,
# so a cache another user can write is a way to run code as you: the image's cache, compiled at
# build time, belongs to root and is read-only; each container copies it into a fresh folder of
# its own (mode 0700, a few MB) where Numba also keeps what it compiles for another CPU.
set -eu
if [ -d /opt/numba-cache ]; then
    NUMBA_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/numba-cache.XXXXXX")
    cp -R /opt/numba-cache/. "$NUMBA_CACHE_DIR"/
    export NUMBA_CACHE_DIR
fi
exec "$@"
