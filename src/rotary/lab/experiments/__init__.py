"""`rotary compare`: train the reference decoder once per positional scheme on the same data, seeds and budget."""
