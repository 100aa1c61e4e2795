"""One module per transform. ONNX-side stages share the :class:`Stage` contract in ``base``."""
