"""CPU benchmarks (``make bench``); run each as ``python -m benchmarks.<name>`` from the root."""
