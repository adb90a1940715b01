"""The package version, in a module of its own so that writers of files (ONNX metadata, save) can
stamp it without importing the package root, which imports everything."""
__version__ = "0.1.0"
