"""The host layer: facts detected once, the prepare step (all I/O that planning needs), cgroups,
networks, subordinate ids, user tables, bound sockets, pinned mount sources, runtime paths, the
run's state file."""
