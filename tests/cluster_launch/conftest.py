"""The `ray up` launch test is not part of `make test`: plain `pytest` does not even collect this directory.

`make cluster-test` sets DIST_CLUSTER_LAUNCH=1 and runs it (root, 5-22 minutes; see cluster/README.md).
"""

import os

if os.environ.get("DIST_CLUSTER_LAUNCH") != "1":
    collect_ignore_glob = ["*.py"]
