"""Running signal-cli for the wallet: the daemon launcher and the ``signal-cli`` commands."""
