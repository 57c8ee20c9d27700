"""Unit tests: no root needed. A package, so that its conftest and shared snippets never clash by
module name with those of tests/integration, whatever order pytest is given the folders in."""
