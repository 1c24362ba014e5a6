"""Locust plugin the runner loads next to the locustfile: flush CSV stats every second.

Locust writes a ``_stats_history.csv`` row every second but flushes the file
only every 5 s; the runner tails that file for its live req/s display, so it
asks for a flush per row. Nothing else changes (no users, no options).
"""

import locust.stats

locust.stats.CSV_STATS_FLUSH_INTERVAL_SEC = 0  # "now - last flush > 0": every row
