"""The netns fixture works: a namespace of our own, loopback up inside it, gone afterwards even
when the test using it fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.netns
def test_netns_fixture_gives_an_empty_namespace_with_loopback(netns) -> None:
    assert netns.name.startswith("hw-")
    assert netns.name in _namespaces()
    netns.ip("link", "set", "lo", "up")
    links = netns.ip("-o", "link").stdout.splitlines()
    # Only loopback inside: a new namespace has no other interface and no route out.
    assert len(links) == 1 and " lo:" in links[0] and "UP" in links[0]
    assert netns.ip("route").stdout.strip() == ""
    assert " lo:" in netns.run("ip", "-o", "link").stdout


@pytest.mark.netns
def test_namespaces_are_deleted_even_when_the_test_fails(pytester: pytest.Pytester) -> None:
    # The inner run is a separate process, with this repository's conftest.
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    names_file = pytester.path / "names.txt"
    pytester.makepyfile(f"""
        def test_inner(netns_factory):
            names = [netns_factory().name for _ in range(3)]
            open({str(names_file)!r}, "w").write("\\n".join(names))
            assert False, "fails on purpose"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    names = names_file.read_text().split()
    assert len(set(names)) == 3 and all(n.startswith("hw-") for n in names)
    listing = _namespaces()
    assert not [n for n in names if n in listing]
