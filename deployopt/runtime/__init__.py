"""onnxruntime lives here: session creation, execution-provider aliases."""
