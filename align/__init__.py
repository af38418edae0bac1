"""align: an LLM alignment training toolkit."""
__version__ = "0.1.0"
