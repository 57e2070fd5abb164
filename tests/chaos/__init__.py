"""Reliability ("chaos") tests: real processes killed, restarted and overloaded."""
