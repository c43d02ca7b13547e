"""Batch generation: the prompts file (text or JSONL jobs) and the resumable runner split over hosts."""
