"""Executors: run a verified schedule's rounds on real tensors, one backend per transport."""
