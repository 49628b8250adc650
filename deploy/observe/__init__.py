"""What the fleet says: the collector and its store (SQLite or PostgreSQL), the fleet state the
commands decide from, and the views of it (fleet table, per-device report, plot, Home Assistant)."""
