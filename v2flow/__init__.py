"""v2flow: discrete visual tokens in an LLM's vocabulary, decoded by rectified flow."""

from .tokenizer import DecodeOutput, EncodeOutput, ReconstructOutput, V2FlowTokenizer
from .vocab import LLMVocabulary

__all__ = ["DecodeOutput", "EncodeOutput", "LLMVocabulary", "ReconstructOutput", "V2FlowTokenizer"]
__version__ = "0.1.0"
