"""dqt test suite (a package, so benchmarks can import the shared case tables in ``tests.cases``)."""
