"""pytest-benchmark microbenchmarks: `pytest bench --benchmark-only` (the test suite, `pytest tests`, never
collects these). Without the pytest-benchmark plugin the bench files are not collected at all."""
import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("pytest_benchmark") else ["test_bench_*.py"]
