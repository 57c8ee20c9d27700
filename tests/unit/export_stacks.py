"""Spec folders the export tests share: one that gives every key, and a table of small stacks.

`rich(image)` gives every key of every kind of unit at least once, away from its default where the
spec allows, so that each key's decision is made on a value the spec wrote; `SMALL` is a table of
small stacks, each with what it is about (sockets in namespaces, networks, volumes, limits,
health checks, accept mode, on-demand start). `IMAGE` stands for the service's image: a registry
reference for Kubernetes, a folder (or host) for systemd.
"""

from __future__ import annotations

RICH = """\
kind: service
name: api
image: IMAGE
command: [/usr/bin/python3, -u, /app/api.py, "100%", "$HOME"]
environment: {MODE: "fast lane", LEVEL: "3"}
env_file: api.env
workdir: /app
hostname: api-host
restart: always
restart_delay: 2s
restart_steps: 3
restart_max_delay: 30s
start_limit: {burst: 7, interval: 20s}
stop_signal: SIGINT
reload_signal: SIGUSR1
stop_timeout: 15s
mounts:
  - source: app
    target: /app
  - volume: data
    target: /var/lib/api
uses: [cache]
network: [back]
ready: notify
notify_access: all
start_timeout: 40s
watchdog: 30s
capabilities: [NET_BIND_SERVICE]
no_new_privs: true
limits: {memory: 256M, memory_high: 200M, swap: 64M, pids: 100, cpu: 1.5, cpu_weight: 200, io_weight: 300}
limits_optional: true
seccomp: [ptrace]
userns: true
readonly_root: true
user: 1000
group: 1000
tmpfs: [{path: /var/cache/api, size: 8M}]
tmpfs_size: 32M
shm_size: 16M
fdstore_max: 4
after:
  - {service: migrate, condition: completed}
---
kind: service
name: migrate
image: IMAGE
command: [/usr/bin/python3, /app/migrate.py]
restart: "no"
reload: [/bin/true]
---
kind: service
name: cache
image: IMAGE
command: [/usr/bin/python3, /app/cache.py]
network: [back]
ready: {exec: [/usr/bin/python3, /app/check.py], interval: 3s, timeout: 2s, retries: 4}
start: on-demand
idle_stop: 60s
---
kind: socket
name: api
service: api
listen: [tcp:0.0.0.0:8080, unix:/run/rich/api.sock]
fdname: http
backlog: 32
mode: "0660"
reuseport: true
---
kind: socket
name: cache
service: cache
listen: tcp:10.1.0.1:6379
netns: service
---
kind: socket
name: echo
service: echo
listen: tcp:127.0.0.1:7000
accept: true
max_connections: 16
---
kind: socket
name: web
service: web
listen: tcp:127.0.0.1:8000
proxy: tcp:127.0.0.1:8001
handoff: false
---
kind: service
name: echo
image: IMAGE
command: [/bin/cat]
---
kind: service
name: web
image: IMAGE
command: [/usr/bin/python3, -m, http.server, "8001"]
---
kind: service
name: metrics
image: IMAGE
command: [/usr/bin/python3, /app/metrics.py]
listen: tcp:0.0.0.0:9100
---
kind: network
name: back
subnet: 10.1.0.0/24
internal: true
---
kind: volume
name: data
"""

SMALL: dict[str, str] = {
    "one service, one host socket": """\
        kind: service
        name: web
        image: IMAGE
        command: [/usr/bin/python3, -m, http.server]
        ---
        kind: socket
        name: web
        listen: tcp:127.0.0.1:8080
        """,
    "socket in the service's namespace": """\
        kind: service
        name: inner
        image: IMAGE
        command: [/usr/bin/python3, /app/inner.py]
        ---
        kind: socket
        name: inner
        listen: tcp:127.0.0.1:9000
        netns: service
        """,
    "two services on a network": """\
        kind: service
        name: a
        image: IMAGE
        command: [/bin/sleep, infinity]
        network: [net]
        ---
        kind: service
        name: b
        image: IMAGE
        command: [/bin/sleep, infinity]
        network: [{name: net, address: 10.5.0.9}]
        ---
        kind: network
        name: net
        subnet: 10.5.0.0/24
        """,
    "a volume and limits": """\
        kind: service
        name: db
        image: IMAGE
        command: [/bin/sleep, infinity]
        mounts: [{volume: db-data, target: /data}]
        limits: {memory: 1G, cpu: 0.5, pids: 64}
        ---
        kind: volume
        name: db-data
        """,
    "a health check and a client": """\
        kind: service
        name: srv
        image: IMAGE
        command: [/usr/bin/python3, /app/srv.py]
        ready: {exec: [/bin/true], interval: 1s}
        network: [{name: net, address: 10.6.0.2}]
        ---
        kind: socket
        name: srv
        listen: tcp:10.6.0.2:5000
        netns: service
        ---
        kind: service
        name: client
        image: IMAGE
        command: [/bin/sleep, infinity]
        network: [net]
        uses: [srv]
        after: [{service: srv, condition: ready}]
        ---
        kind: network
        name: net
        subnet: 10.6.0.0/24
        """,
    "accept mode": """\
        kind: service
        name: echo
        image: IMAGE
        command: [/bin/cat]
        ---
        kind: socket
        name: echo
        listen: tcp:127.0.0.1:7777
        accept: true
        """,
    "on-demand with idle stop": """\
        kind: service
        name: lazy
        image: IMAGE
        command: [/usr/bin/python3, /app/lazy.py]
        start: on-demand
        idle_stop: 30s
        ---
        kind: socket
        name: lazy
        listen: [unix:/run/lazy/lazy.sock, udp:127.0.0.1:5353]
        """,
}
