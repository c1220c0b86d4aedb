"""The ``rankwise`` command line: one module per verb (inspect, compress, eval, tune, train)."""
