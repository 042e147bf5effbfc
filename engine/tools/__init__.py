"""Tools built on the training core: benchmarks, profiling, the FLOP model, evaluation, model
interchange, the demo, figures, the reference harness, the GPU check. The core (``engine/*.py``)
never imports from here."""
