"""Stand-in checkpoints for the demo, the tests and the benchmarks: tiny (and published-width,
few-layer) models saved with save_pretrained, loaded through the same from_pretrained path as
real checkpoints. A package beside mmtrain: the library never imports it (only the
`mmtrain models tiny` command does)."""
