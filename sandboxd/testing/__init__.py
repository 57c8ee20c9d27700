"""A Python API for bringing sandboxd stacks up in tests, and a pytest plugin built on it.

    from sandboxd import testing

    with testing.Stack("specs/") as stack:
        host, port = stack.address("web")            # the real address; port 0 resolved
        ...
        stack.restart("backend")
        print(stack.logs("backend"))

With pytest (the plugin, sandboxd.testing.plugin, is registered through the `pytest11` entry
point when sandboxd is installed):

    def test_web_answers(sandboxd_stack):
        stack = sandboxd_stack("specs/", environment={"web": {"GREETING": "hi"}})
        host, port = stack.address("web")

pytest is an optional extra (`sandboxd[test]`): this package and `Stack` import without it;
only the plugin module imports pytest.
"""

from sandboxd.testing.stack import Stack

__all__ = ["Stack"]
