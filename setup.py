"""Build script: the pure-Python package (the C++/CUDA extension is added by csrc/)."""
from setuptools import setup

setup()
