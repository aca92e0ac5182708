"""Models: config, loading (HF directories, GGUF), tokenizer, the plan, the plaintext reference.

Entry points: `load.load_model(spec)`, `reference.generate(...)`, `plan.build_plan(config)`,
`fetch.fetch_smollm2()`, and the click group `commands.models`.
"""
