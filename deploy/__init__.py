"""edgefleet host side, in three parts and a command line:

* :mod:`deploy.control` — decide and act: publish bundles, select, assign, staged rollouts, signed
  commands, the long-running controller;
* :mod:`deploy.observe` — what the fleet says: the collector, its store (SQLite or PostgreSQL), the fleet
  state every decision reads, and its views (fleet table, report, plot, Home Assistant);
* :mod:`deploy.broker` — the MQTT client session, private brokers for tests and the demo, the hardened
  broker configuration and device provisioning;
* :mod:`deploy.cli` (``edgefleet``), :mod:`deploy.demo`, and what all share: :mod:`deploy.errors`,
  :mod:`deploy.keys`, :mod:`deploy.hostconfig`, :mod:`deploy.progress`.
"""
