"""``python -m deploy`` runs the host CLI (same as ``edgefleet``)."""

import sys

from deploy.cli import main

sys.exit(main())
