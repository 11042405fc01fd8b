"""Checkpoint files, independent of the model: reading safetensors safely (`safetensors`),
checking names, dtypes and shapes (`checks`), finding a model locally or on the Hub
(`hub`), writing output directories atomically (`atomic`) and fitting in memory (`memory`).
"""
