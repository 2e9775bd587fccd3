"""What a run reports: logging, metrics rows, trackers, throughput and MFU, classification metrics."""
