"""Loading, quantizing and building models."""
