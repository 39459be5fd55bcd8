"""Quantized storage: bit packing, the packed ``QuantLinear`` layer, the checkpoint format, its registration with
transformers, and the exports to other engines' formats (one module each under ``exports``)."""
