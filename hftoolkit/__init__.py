"""hftoolkit: fine-tune GPT-2-class decoder-only models with the Hugging Face stack.

Usage: hftoolkit train recipes/quickstart/generation.yaml
"""

__version__ = "0.1.0"
