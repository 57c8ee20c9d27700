# Sourced by scripts/install and scripts/test: install_missing PACKAGE... installs, with apt-get,
# the Debian packages that are not installed yet. Packages with a service of their own (nginx,
# redis, PostgreSQL) are only installed, never started: a policy-rc.d that refuses every start is
# in place while apt-get runs, unless the machine has one already.
install_missing() {
    _missing=""
    for _package in "$@"; do
        dpkg-query -W -f='${Status}\n' "$_package" 2>/dev/null | grep -q "ok installed" || _missing="$_missing $_package"
    done
    [ -n "$_missing" ] || return 0
    echo "installing Debian packages:$_missing"
    _policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# sandboxd set-up: install packages, start none of their services\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        _policy=/usr/sbin/policy-rc.d
    fi
    _status=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $_missing >/dev/null; } || _status=$?
    [ -z "$_policy" ] || rm -f "$_policy"
    return $_status
}
