"""``python -m agent --config agent.toml`` runs the device agent."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
