"""RELIABILITY: votes with deadlines, step control, guards, preemption, fault injection."""
