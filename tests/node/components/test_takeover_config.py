"""The takeover's config: ``[filters] tcp_action`` and ``[takeover]``, checked with the bad key
named; the component is built only under the takeover action."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.daemon.config import ConfigError, load_config


def test_an_unknown_tcp_action_is_refused_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text('[filters]\ntcp_action = "takover"\n[takeover]\npolicy = "scrubb"\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "filters.tcp_action" in str(e.value) and "takover" in str(e.value)
    assert "takeover.policy" in str(e.value)
    good = tmp_path / "ok.toml"
    good.write_text('[filters]\ntcp_action = "takeover"\n[takeover]\npolicy = "respond"\n'
                    'reply = "no"\n')
    cfg = load_config(good)
    assert (cfg.filters.tcp_action, cfg.takeover.policy, cfg.takeover.reply) == \
        ("takeover", "respond", "no")


@pytest.mark.parametrize("action", ["drop", "reject", "takeover"])
def test_the_takeover_component_comes_with_the_takeover_action(tmp_path: Path,
                                                               action: str) -> None:
    from types import SimpleNamespace

    from node.components import build

    path = tmp_path / "node.toml"
    path.write_text(f'[filters]\ntcp_action = "{action}"\n[overlay]\nenabled = false\n'
                    "[throttle]\nenabled = false\n")
    names = [c.name for c in build(SimpleNamespace(config=load_config(path), images=[]))]
    assert names == (["takeover"] if action == "takeover" else [])
