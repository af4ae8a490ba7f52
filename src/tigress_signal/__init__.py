"""tigress-signal: move digital credentials between wallets over the Signal protocol."""

__version__ = "0.1.0"
