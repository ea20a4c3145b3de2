"""Retrieval: ScaNN index, Search-R1 compatible HTTP server and client."""
