"""The sandbox layer: the fork server, the child that sets a sandbox up, and joining a running one."""
