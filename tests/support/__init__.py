"""What several test modules share (shards, a stand-in engine, kernel comparisons)."""
