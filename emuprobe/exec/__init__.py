"""Layer 3: executing one Plan against a stopped thread: the FastPath, the host
CPU for SSE, the Unicorn machines, the out-of-line instruction preparer.
"""
