"""Small built-in datasets for the examples, the demo and the reproduction scripts."""
