"""edgeloop contracts: every message that crosses a process boundary."""
