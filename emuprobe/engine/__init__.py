"""Layer 4: probes, sites and the planted table, tracees, waits, stepping,
the compiled hot loop, and the Session that composes them.
"""
