"""Layer 2, pure x86 knowledge: bytes to Plan (one capstone instance), the
policy and trust rules, register layouts, effective addresses.
"""
