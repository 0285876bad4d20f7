"""``lorasup serve``: a queue daemon that keeps many supervised runs going on one machine.

The daemon is a small scheduler, store and API; every run is supervised by its own
``lorasup start`` process, so a run outlives a crash of the daemon and is re-adopted.
"""
