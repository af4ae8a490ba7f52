"""The Tigress mailbox relay (draft-vinokurov-tigress-http-00), the baseline of the comparison.

Run it with :func:`~tigress_signal.relay.server.serve` (``tigress-signal relay serve``) or
:class:`~tigress_signal.relay.server.RelayServer`; talk to it with
:class:`~tigress_signal.relay.client.RelayClient`. The relay keeps short-lived mailboxes of
ciphertext, bound to two device claims, and nothing that names a person or a device.
"""
