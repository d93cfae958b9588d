"""What each nox session does. `noxfile.py` only declares sessions and calls these."""
