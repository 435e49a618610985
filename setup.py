"""The one C extension (``node.takeover._fastack``: a takeover's first ACK, sent before any
Python runs); everything else is in pyproject.toml."""

from setuptools import Extension, setup

# optional: where it cannot be built the install goes on, and the takeover queue answers
# triggers from Python (it logs a warning); the tests fail without it when CI is set.
setup(ext_modules=[Extension("node.takeover._fastack", ["node/takeover/_fastack.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"], optional=True)])
