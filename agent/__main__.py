"""``python -m agent --config agent.toml`` runs the device agent."""

import sys

from agent.cli import main

sys.exit(main())
