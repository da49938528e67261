"""Frame and video encoding (CPU work, off the event loop and off the model's worker thread)."""
