"""Floe's Flower app bundle: imports only (the code is the installed Floe's)."""
