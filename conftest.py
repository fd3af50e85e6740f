"""Repository-wide test configuration (fixtures of real servers come from the
``edgeloop.devstack.pytest_plugin`` plugin)."""
