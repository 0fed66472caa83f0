"""Everything that answers requests: ONNX export, the HTTP feature server, Triton, faiss search, demo.

Modules import their heavy dependencies (torch, onnxruntime, faiss, gradio) themselves, so
``import serve`` stays cheap. ``serve`` imports ``zoo``; ``zoo`` never imports ``serve``.
"""
