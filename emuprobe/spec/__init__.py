"""Layer 1, pure: the PROBE grammar, perf's probe forms and fetch arguments.
Imports only emuprobe.errors.
"""
