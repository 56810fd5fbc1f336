"""SpecOffload runtime: checkpoint loading, model layers, the offload engine (torch).

Modules (imported on use, so ``import specoffload.runtime`` does not pull in torch):

- ``config``     HF config.json -> :class:`ModelArgs` (Llama / Mistral / Mixtral)
- ``loader``     streaming safetensors loader: name map + placement callback, checked
- ``layers``     per-layer pieces over plain tensor dicts: qkv, attention, attn_out, ffn / route / moe_experts
- ``kv_cache``   host-resident ragged KV cache with append, rollback and slot reuse
- ``model``      whole-model forward built from the pieces (:class:`Transformer`)
- ``generate``   plain batched generation (greedy, temperature, top-k, top-p, min-p)
- ``prompts``    JSONL prompt files (:class:`Prompt`) and model folder names
- ``requests_io`` Prompt -> engine Request, Finished -> output line (:class:`RequestIO`)
- ``generation_config`` / ``chat``  a model folder's generation_config.json and chat template
- ``tiny_pair``  the shipped tiny Mixtral target / Mistral draft (package data)
"""
