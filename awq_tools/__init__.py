"""awq_tools: AWQ W4A16 tools for the language model of a VLM (the vision tower stays 16-bit).

Today: ``awq_tools estimate`` (``cli.py``), the memory a checkpoint needs in fp16 and in W4A16. The
arithmetic lives in ``internvl_plugin.memory`` and the checkpoint format in
``internvl_plugin.awq_checkpoint``, shared with ``hub_cli``.
"""
