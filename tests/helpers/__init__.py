"""Helpers shared by several test folders: shard corpora, a tiny backbone and a local Ray, stores to compare, moto S3."""
