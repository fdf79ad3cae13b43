"""Layer 1, the operating system: ptrace, /proc maps and memory, tasks, ELF files
and libraries.  Imports only emuprobe.errors and emuprobe.platform.
"""
