"""klstore: layer x generated-token KL-divergence maps of causal language models.

Importing the package does nothing but define names; heavy libraries (torch,
transformers, ray) are imported by the modules that need them.
"""

__version__ = "0.1.0"
