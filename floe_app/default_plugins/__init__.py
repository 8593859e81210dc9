"""Plugins that ship with Floe and are registered whatever FLOE_PLUGINS says."""
