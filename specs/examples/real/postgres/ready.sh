#!/bin/sh
# Readiness check, run by sandboxd inside the sandbox: PostgreSQL accepts sessions. Until it does,
# sandboxd's proxy holds connections in the socket's queue (a server that only listens would answer
# "the database system is starting up").
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
exec "$bin/pg_isready" -q -h 127.0.0.1 -p 5432
