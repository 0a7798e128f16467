"""Token data: Megatron .bin/.idx files, packed GPT samples, tokenizers."""
