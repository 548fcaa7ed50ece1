"""awq_tools: AWQ W4A16 quantization of a VLM's language model (vision stays 16-bit), evaluation,
memory estimates. The command-line entry point is ``awq_tools`` (``awq_tools.cli:main``)."""
