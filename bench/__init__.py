"""fastpref benchmarks (not tests): timing and memory of fastpref against the alternatives."""
