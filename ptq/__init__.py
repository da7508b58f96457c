"""ptq: post-training compression of LLMs. Importing the package registers the built-in checkpoint readers
(`ptq.export`) with the loader (`ptq.model_io`), which itself never imports an exporter."""
from ptq import export as _export  # noqa: F401
