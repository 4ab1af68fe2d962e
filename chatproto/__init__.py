"""Cluster chat server: protocol, handlers, storage, presence and relay."""
