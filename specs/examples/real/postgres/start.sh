#!/bin/sh
# Start PostgreSQL in its sandbox: initialise the data directory on the first start (the volume is
# empty then), and replace this shell with the server, so that it gets sandboxd's signals.
set -eu
data=/var/lib/postgresql/data
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

if [ ! -e "$data/PG_VERSION" ]; then
    # trust: the server is reachable only through sandboxd's socket, whose file mode decides who
    # may connect. --no-sync and fsync=off make the first start fast; fine for an example, not for
    # data you want to keep through a power cut.
    "$bin/initdb" --auth=trust -U postgres --no-sync -D "$data"
fi

exec "$bin/postgres" -D "$data" \
    -c listen_addresses=127.0.0.1 -c port=5432 \
    -c unix_socket_directories=/tmp \
    -c fsync=off
