#!/usr/bin/env python3
"""Build, inspect and remove network-namespace testbeds (root): the same as
``herdwall testbed up|down|status``.

    .venv/bin/python scripts/testbed.py up --name tb1 --vulnerable 16 --detectors 2 --nodes
    .venv/bin/python scripts/testbed.py status
    .venv/bin/python scripts/testbed.py down            # every testbed up, and orphaned hw-*

Namespaces are named hw-…, addresses lie in 10.77.0.0/16 and there is no route out; nothing is
installed in the machine's own namespace (see shared/DESIGN.md, "Testbed and safety").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.cli import main

if __name__ == "__main__":
    main(args=["testbed", *sys.argv[1:]], prog_name="scripts/testbed.py")
