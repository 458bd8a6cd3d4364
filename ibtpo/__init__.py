"""The ``ibtpo`` command: the top floor, driving the flows (``ibtpo/cli.py``)."""
