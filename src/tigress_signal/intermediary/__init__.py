"""The self-hosted intermediary: a Signal-Server-style keys and messages API, and its client.

Run it with :func:`serve` (``tigress-signal serve``) or :class:`IntermediaryServer`; talk to it
with :class:`IntermediaryClient`. The HTTP contract is in ``docs/architecture.md``.
"""
