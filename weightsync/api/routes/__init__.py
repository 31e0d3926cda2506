"""Routers, one per concern: health, engines, syncs, the status page."""
