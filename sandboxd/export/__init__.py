"""The export layer: a checked stack (sandboxd.spec) as what other engines run, and what became of each key.

    decisions   the record of what each key of each unit became (mapped, approximated, not expressible)
    lines       the line each key was written on, read again from the spec file
    kubernetes  a stack as one multi-document YAML: Deployments, StatefulSets, Jobs, Services, PVCs, NetworkPolicies
    pod         a service as a pod template: containers, securityContext, resources, probes, volumes
    policies    networks and sockets' clients as NetworkPolicies
    activator   the socket activator delivered into pods: its init container and arguments (activator.c)
    systemd     a stack as .service, .socket and .target units
    systemd_service  a service's sandbox as systemd.exec directives
    unitfile    unit files as data, their text and quoting
    seccomp     sandboxd's seccomp filter as SystemCallFilter= and as a Localhost profile

It reads the checked model and the seccomp tables (sandboxd.kernel.seccomp) and starts nothing:
it returns texts, and the command line (cli/export.py) writes them.
"""
