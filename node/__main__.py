"""``python -m node`` runs the herdwall CLI (same as the ``herdwall`` console script)."""

from node.cli import main

main(prog_name="herdwall")
