"""Stand-ins for services the project does not run itself, for tests and ``compare``.

:mod:`.fake_signal_cli` plays signal-cli 0.13.19 and Signal's servers in one process. Nothing
here talks to Signal: what runs over it shows that the wallet's signal-cli channel works, not how
Signal's real servers behave.
"""
