"""Network-namespace testbeds (see ``node.testbed.netns``)."""

from node.testbed.netns import Host, Namespace, NetnsError, Testbed, leftovers, unique_name

__all__ = ["Host", "Namespace", "NetnsError", "Testbed", "leftovers", "unique_name"]
