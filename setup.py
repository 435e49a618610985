"""The one C extension (``node.takeover._fastack``: a takeover's first ACK, sent before any
Python runs); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("node.takeover._fastack", ["node/takeover/_fastack.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
