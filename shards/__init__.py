"""Dataset -> shards: webdataset tars with DALI index files, FFCV betons, and a manifest."""

__version__ = "0.1.0"
