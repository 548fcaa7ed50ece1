"""awq_tools: AWQ W4A16 tools for the language model of a VLM (the vision tower stays 16-bit).

    cli.py        the ``awq_tools`` command: quantize, eval, estimate
    quantize.py   the streaming, resumable layer-by-layer quantizer (one decoder layer in memory)
    awq.py        the AWQ math on one layer: statistics, smoothing scales (fixed or searched), RTN
    backbones.py  InternLM2 / Qwen2 / Llama / Phi-3: weight names, smoothing pairs, decoder-layer forward
    shards.py     safetensors headers, streaming reads, atomic shard writes, input fingerprints
    calib.py      calibration / evaluation text: named datasets through ``datasets``, local .txt / .jsonl
    evaluate.py   perplexity through vLLM prompt logprobs

The AWQ tensor format is ``internvl_kernels.awq_format``'s, the checkpoint conventions
``internvl_plugin.awq_checkpoint``'s and the memory arithmetic ``internvl_plugin.memory``'s, shared with
``hub_cli`` and the vLLM method.
"""
