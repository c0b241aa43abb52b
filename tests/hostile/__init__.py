"""Hostile-client tools: schema fuzzing, a mixed soak, shared probes of a running stack.

Reusable outside pytest (``python -m tests.hostile.fuzz``, ``python -m
tests.hostile.soak``) against any URL; the e2e tests run short versions of
both against their own server.
"""
