"""TensorRT engines from our ONNX exports: the build recipe, the engine and timing caches, the
checks TensorRT's ONNX parser needs, and the builder itself.

Only `device.py` and `build.py` touch the `tensorrt` module, and only inside functions: the
recipe, the cache keys and the ONNX checks work (and are tested) on machines without a GPU.
"""
