"""The spec layer: YAML unit files become frozen, checked dataclasses.

    model     the dataclasses a spec folder becomes (Stack, Service, Socket, Network, Volume ...)
    values    plain values to typed ones: addresses, durations, sizes, signals, modes, subnets
    nodes     YAML nodes to values, every problem with its node; key tables read by `read_keys`
    keys      the key table of every kind of unit: each key's parser and default
    interpolate  `${VAR}` in spec values, compose's forms, on the YAML nodes before keys are read
    envfile   env files (.env, env_file:, --env-file) and a service's environment in compose's precedence
    sources   opening a bind mount's source as written (beneath the spec folder if relative)
    load      load_stack: files, documents, units, who may change them, then the checks
    checks    the checks between units: names, addresses, uses, networks, dependencies
    trust     which files nobody but root can change
    overrides a loaded stack with `--env SERVICE:KEY=VALUE` applied
    diff      what changed between two specs of one stack (reload)

Nothing here imports a layer above it (plan, store, host ...): only sandboxd.kernel and
sandboxd.errors.
"""
