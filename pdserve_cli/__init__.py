"""The ``pdserve`` command and the local-cluster launcher: the top of the stack, free to use every layer
(the ``pdserve`` library, the services, the benchmarks), which the library itself never imports."""
