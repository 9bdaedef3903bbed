"""``python -m expertflow.services ...`` is ``expertflow-store ...`` (for environments without the script)."""

import sys

from expertflow.cli import store_main

sys.exit(store_main())
