"""hetretrieval: content-based image retrieval on heterogeneous iconographic collections."""

__version__ = "0.1.0"
