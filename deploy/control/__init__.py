"""Deciding and acting on the fleet: publish bundles, select variants, assign them, staged rollouts,
signed commands and the long-running controller. Reads the fleet through :mod:`deploy.observe`, talks to
the broker through :mod:`deploy.broker`."""
