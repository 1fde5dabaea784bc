"""The actor runtime: engine, node actors, router and store actors, and their messages."""
