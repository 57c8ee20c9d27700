"""The host layer: facts detected once, cgroups, networks, subordinate ids, bound sockets, pinned mount sources, the run's state file."""
