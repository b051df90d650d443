"""Serving N fine-tuned variants: serving memory, throughput, training cost, the fleet planner and launch settings."""
