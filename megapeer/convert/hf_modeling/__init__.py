"""Modeling code copied into every exported `megapeer` folder (see megapeer/convert/export.py)."""
