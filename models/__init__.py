"""Pure PyTorch: networks, tokenizer, samplers, generation engines, artifact I/O.

Nothing here imports bentoml, training/ or service/: it must run where only torch is installed.
"""
