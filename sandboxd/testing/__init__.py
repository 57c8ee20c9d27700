"""A Python API for bringing sandboxd stacks up in tests, and a pytest plugin built on it.

    from sandboxd import testing

    with testing.Stack("specs/", listen={"web": "tcp:127.0.0.1:0"}) as stack:
        stack.wait_for_accept("web")                 # the service took a probe connection
        host, port = stack.address("web")            # the real address; port 0 resolved
        ...
        stack.restart("backend")
        print(stack.logs("backend"))

What a Stack offers: `up`, `down` (and `with`), `status`, `address`, `addresses`, the waits
(`wait_ready`, `wait_for_log`, `wait_for_http`, `wait_for_accept`), `logs`, `exec`, `restart`,
`stop`, `start`, and `failure_report`. Every wait raises SandboxdError at once when a service it
waits on fails, with the last lines of the logs.

With pytest (the plugin, sandboxd.testing.plugin, is registered through the `pytest11` entry
point when sandboxd is installed):

    def test_web_answers(sandboxd_stack):
        stack = sandboxd_stack("specs/", environment={"web": {"GREETING": "hi"}})
        host, port = stack.address("web")

A test that fails gets a section per stack in its report: the services' states and the last
lines of their logs.

pytest is an optional extra (`sandboxd[test]`): this package and `Stack` import without it;
only the plugin module imports pytest.
"""

from sandboxd.testing.stack import Stack

__all__ = ["Stack"]
